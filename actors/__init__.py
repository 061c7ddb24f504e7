"""pydra-actors: a distributed task runtime for Python built on the actor model."""

__version__ = "0.1.0"

from actors.async_client import AsyncClient  # noqa: E402
from actors.client import Client, Future, fire_and_forget  # noqa: E402
from actors.cluster import LocalCluster  # noqa: E402
from actors.containers import MapReduceTask, TaskContainer  # noqa: E402
from actors.display import TaskLine, progress  # noqa: E402
from actors.task import ParallelTask, Task, Unit  # noqa: E402
from actors.waiting import (  # noqa: E402
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    as_completed,
    gather,
    wait,
)

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "AsyncClient", "Client", "Future",
           "MapReduceTask",
           "LocalCluster", "ParallelTask", "Task", "TaskContainer", "TaskLine", "Unit",
           "as_completed", "fire_and_forget", "gather",
           "progress", "wait", "__version__"]
