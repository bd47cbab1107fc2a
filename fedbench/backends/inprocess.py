"""The in-process backend: every client step runs here, one after another, deterministically."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from fedbench.client import ClientRuntime, Message, State, TrainReply
from fedbench.evaluation import EvalReply
from fedbench.faults import error_line

T = TypeVar("T")


class InProcessBackend:
    """Calls :class:`~fedbench.client.ClientRuntime` directly; client states stay in its memory
    (and in the run's checkpoint). A client step that raises is a dropped client, as an error reply
    is on Flower: its reply is None, :meth:`drop_reason` says why, and the round goes on."""

    name = "inprocess"

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self.errors: dict[int, str] = {}  # client -> why its last reply is missing

    def _each(self, step: Callable[[Message], T], messages: Sequence[Message]) -> Iterator[T | None]:
        self.errors = {}
        for m in messages:
            try:
                yield step(m)
            except Exception as err:  # a KeyboardInterrupt still stops the run (and it resumes)
                self.errors[m.client] = error_line(err)
                yield None

    def query(self, messages: Sequence[Message]) -> Iterator[bytes | None]:
        return self._each(self.runtime.query, messages)

    def train(self, messages: Sequence[Message]) -> Iterator[TrainReply | None]:
        return self._each(self.runtime.train, messages)

    def evaluate(self, messages: Sequence[Message]) -> Iterator[EvalReply | None]:
        return self._each(self.runtime.evaluate, messages)

    def client_states(self) -> dict[int, State]:
        return dict(self.runtime.states)

    def restore(self, states: dict[int, State]) -> None:
        self.runtime.states.clear()
        self.runtime.states.update(states)

    def drop_reason(self, client: int) -> str:
        return self.errors.get(client, "")
