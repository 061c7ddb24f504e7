"""A node's first workers, forked rather than spawned.

A fresh interpreter spends most of its start importing what a worker needs (structlog, zmq,
msgspec, pykka, this package): the first result of a new cluster waited for exactly that.
The node has imported all of it already, so on Linux it forks its first workers as it starts,
before it reads its keys (a child must not hold the node's secret key) and before it starts any
thread (a fork copies locks that a thread of the parent may hold, and the thread is not there to
release them). A forked worker then sets itself up as a spawned one is set up: its own session,
nothing of the node's left open, a scratch folder as home, temporary folder and working directory,
a scrubbed environment (the strings the node started with wiped too: ``/proc/self/environ`` shows
them), stdin from /dev/null, stdout and stderr a pipe its node reads (worker_output.py), its
containment plan applied (``contain.py``); then it runs
``actors.worker.main``. Workers that replace dead ones are spawned as
fresh interpreters: by then the node runs threads. ``ps`` shows a forked worker with its node's
command line.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.contain import TOKEN_ENV, Plan, contain_or_exit, wipe_initial_environment
from actors.forking import fork_is_safe, frozen

# What a worker may see of the node's environment; everything else is scrubbed.
_ENV_KEPT = ("PATH", "PYTHONPATH", "LANG", "TZ", "VIRTUAL_ENV", "SYSTEMROOT")


@dataclass(frozen=True)
class Forked:
    worker_id: str
    pid: int
    scratch: str
    plan: Plan = field(default_factory=Plan)
    token: str = ""  # the secret it says in its Hello (see worker_token)
    output: int = -1  # the read end of its stdout and stderr (worker_output.py)


def worker_token() -> str:
    """A worker's secret, said in its Hello (contain.TOKEN_ENV; node.py, "Proof")."""
    return secrets.token_hex(16)


def worker_env(scratch: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT or k.startswith(("LC_", "ACTORS_"))}
    env.update(HOME=scratch, TMPDIR=scratch, PYTHONUNBUFFERED="1")
    return env


def worker_args(ipc_address: str, worker_id: str) -> list[str]:
    return ["--node", ipc_address, "--id", worker_id, "--node-pid", str(os.getpid())]


def fork_workers(node_id: str, run_dir: str, ipc_address: str, count: int,
                 plan_for: Callable[[str], Plan]) -> list[Forked]:
    """Fork ``count`` workers ``{node_id}/w1..``; an empty list where forking is not safe.
    ``plan_for(scratch)`` gives each its containment plan and readies its scratch folder."""
    if not fork_is_safe():  # Linux, one thread: see forking.py
        return []
    import actors.worker  # noqa: F401  (imported here, once, so no child imports it)

    forked: list[Forked] = []
    # The node's objects frozen out of the workers' collector (a worker that walked them would
    # copy their pages: ~7 MiB a worker)
    with frozen():
        for seq in range(1, count + 1):
            worker_id = f"{node_id}/w{seq}"
            scratch = tempfile.mkdtemp(prefix=f"w{seq}-", dir=run_dir)
            plan = plan_for(scratch)
            args = worker_args(ipc_address, worker_id)
            token = worker_token()
            output, written = os.pipe()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                forked.clear()  # (the secrets of the workers forked before this one)
                _become_worker(scratch, args, plan, token, written)
            os.close(written)
            forked.append(Forked(worker_id, pid, scratch, plan, token, output))
    return forked


def _become_worker(scratch: str, args: list[str], plan: Plan, token: str, output: int) -> None:
    """In the child: never returns. ``output``: its stdout and stderr from now on."""
    code = 70
    try:
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.setsid()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the node's run folder and uid locks
        os.chdir(scratch)
        env = worker_env(scratch)
        os.environ.clear()
        os.environ.update(env)
        wipe_initial_environment()
        os.environ[TOKEN_ENV] = token  # (not in /proc/PID/environ: that shows what was wiped)
        tempfile.tempdir = None  # the node's choice, cached: the worker's is its scratch folder
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        contain_or_exit(plan)
        from actors.worker import main

        code = main(args)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
