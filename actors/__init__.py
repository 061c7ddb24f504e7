"""pydra-actors: a distributed task runtime for Python built on the actor model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): a master, node or worker process imports
# ``actors.master`` and the like, and need not pay for the client's modules (asyncio among
# them: ~45 ms of every process's start).
_PUBLIC = {
    "AsyncClient": "actors.async_client",
    "Client": "actors.client", "Future": "actors.client", "fire_and_forget": "actors.client",
    "LocalCluster": "actors.cluster",
    "MapReduceTask": "actors.containers", "TaskContainer": "actors.containers",
    "TaskLine": "actors.display", "progress": "actors.display",
    "ParallelTask": "actors.task", "Task": "actors.task", "Unit": "actors.task",
    "ALL_COMPLETED": "actors.waiting", "FIRST_COMPLETED": "actors.waiting",
    "FIRST_EXCEPTION": "actors.waiting", "as_completed": "actors.waiting",
    "gather": "actors.waiting", "wait": "actors.waiting",
}

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "AsyncClient", "Client", "Future",
           "LocalCluster", "MapReduceTask", "ParallelTask", "Task", "TaskContainer", "TaskLine",
           "Unit", "as_completed", "fire_and_forget", "gather", "progress", "wait", "__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from actors.async_client import AsyncClient
    from actors.client import Client, Future, fire_and_forget
    from actors.cluster import LocalCluster
    from actors.containers import MapReduceTask, TaskContainer
    from actors.display import TaskLine, progress
    from actors.task import ParallelTask, Task, Unit
    from actors.waiting import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        as_completed,
        gather,
        wait,
    )
