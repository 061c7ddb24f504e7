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
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.contain import TOKEN_ENV, Plan, contain_or_exit, wipe_initial_environment
from actors.forking import fork_is_safe, frozen
from transport.links import pair

#: The descriptor a forked worker's end of its link has, on a node with ``--worker-links``
#: (its stdin, stdout and stderr before it)
LINK_FD = 3

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
    link: socket.socket | None = None  # the node's end of its link (--worker-links)


def worker_token() -> str:
    """A worker's secret, said in its Hello (contain.TOKEN_ENV; node_actor.py, "Proof")."""
    return secrets.token_hex(16)


def worker_env(scratch: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT or k.startswith(("LC_", "ACTORS_"))}
    env.update(HOME=scratch, TMPDIR=scratch, PYTHONUNBUFFERED="1")
    return env


def worker_args(ipc_address: str, worker_id: str, link_fd: int = -1) -> list[str]:
    """A worker's command line: its way to its node (a link's end it inherits, ``link_fd``,
    or the node's ipc socket), its id, its node's pid."""
    to_node = ["--link-fd", str(link_fd)] if link_fd >= 0 else ["--node", ipc_address]
    return [*to_node, "--id", worker_id, "--node-pid", str(os.getpid())]


def fork_workers(node_id: str, run_dir: str, ipc_address: str, count: int,
                 plan_for: Callable[[str], Plan], *, links: bool = False) -> list[Forked]:
    """Fork ``count`` workers ``{node_id}/w1..``; an empty list where forking is not safe.
    ``plan_for(scratch)`` gives each its containment plan and readies its scratch folder.
    ``links``: each is given its end of a link to the node (``Forked.link`` is the node's)."""
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
            args = worker_args(ipc_address, worker_id, LINK_FD if links else -1)
            token = worker_token()
            output, written = os.pipe()
            ours, theirs = pair() if links else (None, None)
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                forked.clear()  # (the secrets and links of the workers forked before this one)
                _become_worker(scratch, args, plan, token, written,
                               theirs.fileno() if theirs is not None else -1)
            os.close(written)
            if theirs is not None:
                theirs.close()
            forked.append(Forked(worker_id, pid, scratch, plan, token, output, ours))
    return forked


def _become_worker(scratch: str, args: list[str], plan: Plan, token: str, output: int,
                   link: int = -1) -> None:
    """In the child: never returns. ``output``: its stdout and stderr from now on; ``link``
    (if any): its end of its link to the node, ``LINK_FD`` from now on."""
    code = 70
    try:
        os.dup2(output, 1)
        os.dup2(output, 2)
        first_closed = 3
        if link >= 0:
            os.dup2(link, LINK_FD)
            first_closed = LINK_FD + 1
        os.setsid()
        # the node's run folder and uid locks (and the node's ends of the links forked before)
        os.closerange(first_closed, os.sysconf("SC_OPEN_MAX"))
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
