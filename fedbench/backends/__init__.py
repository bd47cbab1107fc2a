"""Backends: what moves the client step's messages. ``inprocess`` calls it directly; ``flower-sim``
and ``flower-deploy`` carry the same messages over Flower."""
