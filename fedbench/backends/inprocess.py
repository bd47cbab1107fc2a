"""The in-process backend: every client step runs here, one after another, deterministically."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from fedbench.runtime.client import ClientRuntime, Message, State, TrainReply
from fedbench.runtime.client_store import ClientStore
from fedbench.runtime.evaluation import EvalReply
from fedbench.runtime.faults import error_line
from fedbench.utils.integrity import IntegrityError

if TYPE_CHECKING:
    from fedbench.runtime.server import Run

T = TypeVar("T")


class InProcessBackend:
    """Calls :class:`~fedbench.runtime.client.ClientRuntime` directly; a run keeps the client states in its
    client store, on disk, named by its checkpoints (:meth:`restore`). A client step that raises is
    a dropped client, as an error reply is on Flower: its reply is None, :meth:`drop_reason` says
    why, and the round goes on; a damaged stored state stops the run."""

    name = "inprocess"

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self.errors: dict[int, str] = {}  # client -> why its last reply is missing

    def _each(self, step: Callable[[Message], T], messages: Sequence[Message]) -> Iterator[T | None]:
        self.errors = {}
        for m in messages:
            try:
                yield step(m)
            except IntegrityError:  # a damaged stored state stops the run with its one line
                raise
            except Exception as err:  # a KeyboardInterrupt still stops the run (and it resumes)
                self.errors[m.client] = error_line(err)
                yield None

    def query(self, messages: Sequence[Message]) -> Iterator[bytes | None]:
        return self._each(self.runtime.query, messages)

    def train(self, messages: Sequence[Message]) -> Iterator[TrainReply | None]:
        return self._each(self.runtime.train, messages)

    def evaluate(self, messages: Sequence[Message]) -> Iterator[EvalReply | None]:
        return self._each(self.runtime.evaluate, messages)

    def client_states(self) -> MutableMapping[int, State]:
        """The runtime's store itself (no copy: a run's holds thousands of clients' files)."""
        return self.runtime.states

    def restore(self, states: Mapping[int, State]) -> None:
        """A :class:`~fedbench.runtime.client_store.ClientStore` becomes the runtime's store; any other
        mapping's states replace the stored ones (a test crafting a federation)."""
        if isinstance(states, ClientStore):
            self.runtime.states = states
            return
        self.runtime.states.clear()
        self.runtime.states.update(states)

    def drop_reason(self, client: int) -> str:
        return self.errors.get(client, "")


def in_process(run: Run) -> InProcessBackend:
    """The backend factory a run is handed to run its client steps here (``--backend inprocess``)."""
    return InProcessBackend(ClientRuntime(run.prep, run.method))
