"""How a ``LocalCluster`` starts its master and local node: forked, or as fresh interpreters.

Forked (``actors/forking.py``) where that is safe and cheap: from a caller that runs one thread
and holds less than ``FORK_MAX_RSS``, for workers without a memory limit or pause mark. The
first result then comes ~4x sooner, since a fresh interpreter spends most of its start
importing. Anywhere else (a notebook's kernel runs threads; macOS), as a fresh interpreter.
By default the node runs inside the master (``--local-node inside``: the master forks its
workers as it starts, node_parts.py) and ``node`` here is empty. As a process of its own
(``local_node="process"``) it is started first (forked, or before a fresh master's imports);
either way it is the master's child, and the master stops it, or starts another if it dies.

This module runs the process entry points' ``main`` in a forked child (as ``prefork.py`` runs
a worker's): nothing imports it but ``cluster.py``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

from actors import memory
from actors.forking import ChildProcess, fork_call, fork_is_safe

# A forked master, its node and the node's first workers share their caller's memory: every
# page the caller writes afterwards is copied, the old one kept for as long as they live, and
# each of them counts it in its resident size (what the dashboard shows of a worker). A caller
# holding more than this (a process with its data loaded) gets fresh interpreters instead.
FORK_MAX_RSS = 128 << 20
# A worker's memory limit (a data-segment limit) and pause mark (resident memory) would count
# the caller's pages as the task's: with either set, the workers' start is not forked from it.
_WORKER_MEMORY_SETTINGS = ("ACTORS_WORKER_MEMORY", "ACTORS_WORKER_PAUSE")

# A fresh master process starts its local node *before* it imports anything of pydra-actors, so
# that both interpreters start at once rather than one after the other. The node stays the
# master's child, as with ``python -m actors.master``: argv[1] is the node's command line
# (JSON), the rest the master's.
_MASTER_FIRST_STARTS_NODE = (
    "import json, os, subprocess, sys\n"
    "env = dict(os.environ, ACTORS_PARENT_PID=str(os.getpid()))  # (launch.PARENT_PID_ENV)\n"
    "node = subprocess.Popen(json.loads(sys.argv[1]), stdin=subprocess.DEVNULL, env=env)\n"
    "from actors.forking import exit_now\n"
    "from actors.master import main\n"
    "exit_now(main(sys.argv[2:], local_node=node))\n"
)


def may_fork(env: dict[str, str]) -> bool:
    """Whether a cluster started with ``env`` may be forked from this process."""
    return (fork_is_safe() and memory.rss_bytes() < FORK_MAX_RSS
            and not any(env.get(name) for name in _WORKER_MEMORY_SETTINGS))


def start_master(master_args: list[str], node: list[str], env: dict[str, str], *,
                 fork: bool) -> tuple[ChildProcess, bool]:
    """The master process, in a session of its own, with ``env``; ``node``: its local node's
    command line (empty: the master starts one itself once it listens). Forked if ``fork`` and
    ``may_fork(env)``. Returns the process and whether it was forked."""
    if node:
        cmd = [sys.executable, "-c", _MASTER_FIRST_STARTS_NODE, json.dumps(node), *master_args]
    else:
        cmd = [sys.executable, "-m", "actors.master", *master_args]
    if fork and may_fork(env):
        # The cluster's code imported here, once, rather than in each forked process: the
        # imports are most of a master's start, and a script, a test or a benchmark that starts
        # several clusters pays them once.
        import actors.master  # noqa: F401
        import actors.node  # noqa: F401
        import actors.worker  # noqa: F401

        if may_fork(env):  # (the imports start no thread: checked all the same)
            target = functools.partial(_run_master, node, master_args)
            return fork_call(target, args=cmd, env=env, new_session=True), True
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True), False


def _run_master(node: list[str], master_args: list[str]) -> int:
    """In the forked child, what ``_MASTER_FIRST_STARTS_NODE`` does in a fresh interpreter: the
    node forked first (this child runs one thread yet), then the master's main."""
    master = os.getpid()  # (read here: the node may run after this process was killed)
    local_node = (fork_call(functools.partial(_run_node, node, master), args=node)
                  if node else None)
    from actors.master import main

    return main(master_args, local_node=local_node)


def _run_node(node: list[str], master: int) -> int:
    from actors.launch import PARENT_PID_ENV
    from actors.node import main

    os.environ[PARENT_PID_ENV] = str(master)
    return main(node[3:])  # what follows "python -m actors.node"
