"""What a workload is, the settings it reads, and the session it may share with the others."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.peers import OURS, Runtime, Session


@dataclass(frozen=True)
class Settings:
    quick: bool = True
    reps: int = 3
    workers: int = 2
    size_scale: float = 1.0  # multiplies every size (the smoke test runs at 0.01)
    scale_workers: tuple[int, ...] = (2,)
    workers_per_node: int = 4

    def size(self, quick: int, full: int, minimum: int = 1) -> int:
        """The size of a workload in this mode, scaled by ``--size-scale``."""
        return max(minimum, round((quick if self.quick else full) * self.size_scale))


class SharedSession:
    """One cluster per runtime for the workloads that do not need a fresh one: opened on first
    use (with every worker up), closed by the runner before the next runtime starts."""

    def __init__(self, runtime: Runtime, workers: int) -> None:
        self.runtime = runtime
        self.workers = workers
        self._session: Session | None = None

    def __call__(self) -> Session:
        if self._session is None:
            self._session = self.runtime.open(self.workers)
        return self._session

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.close()


@dataclass(frozen=True)
class Workload:
    key: str  # what --only names it
    title: str
    # (runtime, shared session, settings) -> rows; a workload that starts its own clusters
    # ignores the shared session.
    run: Callable[[Runtime, SharedSession, Settings], list]
    uses_shared_session: bool = True


def target(runtime: Runtime, text: str) -> str:
    """Targets are ours to meet: only pydra-actors rows carry one."""
    return text if runtime.name == OURS else ""
