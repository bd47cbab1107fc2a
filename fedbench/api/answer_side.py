"""The answer sides a protocol may choose (``model.answer_side``), named apart from the model that
builds them (:mod:`fedbench.api.model`) so that reading a protocol needs no torch."""

ANSWER_SIDES = ("shared", "per_task", "frozen_trunk")  # one trunk for every task | a head per task | trunk frozen
