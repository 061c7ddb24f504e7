"""pydra-actors: a distributed task runtime for Python built on the actor model."""

__version__ = "0.1.0"

from actors.client import Client, Future, as_completed  # noqa: E402
from actors.cluster import LocalCluster  # noqa: E402
from actors.display import TaskLine, progress  # noqa: E402
from actors.task import ParallelTask, Task, Unit  # noqa: E402

__all__ = ["Client", "Future", "LocalCluster", "ParallelTask", "Task", "TaskLine", "Unit",
           "as_completed", "progress", "__version__"]
