"""Task families, one registered :class:`fedbench.family.TaskFamily` per module (discovered)."""
