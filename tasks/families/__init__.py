"""Task families, one registered :class:`fedbench.api.family.TaskFamily` per module (discovered)."""
