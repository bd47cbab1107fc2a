"""The in-process backend: every client step runs here, one after another, deterministically."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fedbench.client import ClientRuntime, Message, State, TrainReply
from fedbench.evaluation import EvalReply


class InProcessBackend:
    """Calls :class:`~fedbench.client.ClientRuntime` directly; client states stay in its memory
    (and in the run's checkpoint)."""

    name = "inprocess"

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime

    def query(self, messages: Sequence[Message]) -> Iterator[bytes]:
        return (self.runtime.query(m) for m in messages)

    def train(self, messages: Sequence[Message]) -> Iterator[TrainReply]:
        return (self.runtime.train(m) for m in messages)

    def evaluate(self, messages: Sequence[Message]) -> Iterator[EvalReply]:
        return (self.runtime.evaluate(m) for m in messages)

    def client_states(self) -> dict[int, State]:
        return dict(self.runtime.states)

    def restore(self, states: dict[int, State]) -> None:
        self.runtime.states.clear()
        self.runtime.states.update(states)

    def drop_reason(self, client: int) -> str:
        return ""  # in process, a client's error is the run's error: nothing is dropped
