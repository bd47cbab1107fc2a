"""What the server loop reaches clients through: a :class:`Backend` moves
:class:`~fedbench.runtime.client.Message` bytes to the client step and its replies back. The
server loop is handed one (:mod:`fedbench.backends` holds them); it never imports one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any
from typing import Protocol as Interface

from fedbench.runtime.client import Message, State, TrainReply
from fedbench.runtime.evaluation import EvalReply

Progress = Callable[[str, dict[str, Any]], None]  # (event, info): what a run tells its caller as it goes


def no_progress(event: str, info: dict[str, Any]) -> None:
    """The :data:`Progress` of a caller that listens to nothing."""


class Backend(Interface):
    """Moves messages to client steps and their replies back, in message order. A reply is None
    for a client that dropped out (its process died, it timed out): the round goes on without it."""

    name: str

    def query(self, messages: Sequence[Message]) -> Iterable[bytes | None]: ...

    def train(self, messages: Sequence[Message]) -> Iterable[TrainReply | None]: ...

    def evaluate(self, messages: Sequence[Message]) -> Iterable[EvalReply | None]: ...

    def client_states(self) -> MutableMapping[int, State] | None:
        """The clients' stored states where the server can checkpoint them, else None (they live on
        the clients' nodes: a run is not resumable mid-way and restarts)."""

    def restore(self, states: Mapping[int, State]) -> None:
        """From now on the clients' states are ``states``: a run's client store (on disk, named by
        its checkpoints) becomes the store; the contents of any other mapping replace the stored ones."""

    def drop_reason(self, client: int) -> str:
        """Why ``client``'s last reply is missing (an error's text, or a timeout)."""
