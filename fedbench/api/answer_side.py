"""The answer sides a protocol may choose (``model.answer_side``), named apart from the model that
builds them (:mod:`fedbench.api.model`) so that reading a protocol needs no torch."""

FROZEN_TRUNK = "frozen_trunk"  # clip: the trunk frozen at its seeded init; vlm: the LM frozen, no adapter on it
ANSWER_SIDES = ("shared", "per_task", FROZEN_TRUNK)  # one trunk for every task | a head per task | trunk frozen
