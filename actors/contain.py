"""Contained workers: what task code may reach, and how a node sets its workers up (Linux).

Task code runs with its worker's rights, so a worker gets as few as the host allows. Theory of
operation:

1. The node decides once, as it starts and before it runs a thread, what this host allows
   (``Containment.start``): it claims a uid for each of its workers and forks a probe that tries
   every measure in a worker's place. A refused measure is logged once, with the kernel's reason,
   and left out; the node goes on.
2. Each worker process applies its ``Plan`` to itself (``enter``) while it is single-threaded and
   before any task code can run: a forked worker in ``prefork.py``, a spawned one in the
   ``WORKER_SCRIPT`` the node starts. A measure the probe allowed that then fails ends that worker
   (fail closed); the node's start-failure limit applies.
3. The measures, in the order applied:
   - a child subreaper: what a task starts, even after ``setsid``, stays below its worker;
   - the highest OOM score: the kernel's OOM killer picks a worker before its node;
   - a network namespace of its own (with loopback up) unless ``--worker-network``; a node that is
     not root needs a user namespace for it. Workers reach their node over an ipc socket, a file;
   - resource limits: data size (``--worker-memory``), open files, processes (only with a uid of
     its own: the kernel counts processes per uid);
   - when the node is root, a uid and gid of its own (``--worker-uid-base`` + 1 .., skipping any
     uid with an account, 0 and the node's own), with the node's worker group (the base) as its
     only other group. ``/proc/<node>``, the keys, other workers' scratch folders and their
     processes are then out of its reach. Each uid is claimed with a lock file held for the
     node's life, so two nodes on one host never share one;
   - no new privileges: setuid programs run without theirs.
4. Ending a task's processes (``end_descendants``, ``end_orphans``): the node ends everything
   below a worker when the worker's last task ends, and when a worker exits the node (a subreaper
   itself) ends what the worker left, now the node's children.
5. Run folders (``make_run_dir``): named after their process and locked for its life, so a later
   start removes those whose process is gone (``remove_stale_run_dirs``); in the temporary
   folder, or a shorter root where it is too long for the Unix sockets they hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import stat
import struct
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import structlog

from actors import logs
from actors.errors import ContainmentFailed

#: How the node spawns a worker: ``python -c WORKER_SCRIPT actors.worker PLAN ARGS...``; the
#: process contains itself before it imports the entry point (and any task code after it).
WORKER_SCRIPT = (
    "import importlib, sys\n"
    "from actors.contain import Plan, contain_or_exit\n"
    "contain_or_exit(Plan.from_arg(sys.argv[2]))\n"
    "raise SystemExit(importlib.import_module(sys.argv[1]).main(sys.argv[3:]))\n"
)

# A worker proves to its node that it is the process the node started under its id by the
# secret the node gave it (in its environment, read and dropped as it starts): any process that
# can open the node's socket for workers could name itself after a worker (node_actor.py, "Proof").
# A spawned worker's environment says TOKEN_ON_STDIN instead, and the secret comes as the first
# line of its standard input: an environment stays readable in /proc/PID/environ.
TOKEN_ENV = "ACTORS_WORKER_TOKEN"
TOKEN_ON_STDIN = "-"
DEFAULT_UID_BASE = 60000
UID_SPAN = 1000  # uids base+1 .. base+UID_SPAN-1; the group is the base itself
DEFAULT_OPEN_FILES = 1024
DEFAULT_PROCESSES = 2048  # per worker uid; the kernel counts threads too
UID_LOCKS = os.path.join("/run" if os.path.isdir("/run") else tempfile.gettempdir(),
                         "pydra-actors-uids")
SWEEP_ROUNDS = 20  # a task's processes forking as they are killed: rounds before giving up

_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH22x"
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class Limits:
    """What the node's command line asks of its workers."""

    memory: int | None = None  # bytes of data (heap and private mappings) per process
    open_files: int = DEFAULT_OPEN_FILES
    processes: int = DEFAULT_PROCESSES
    network: bool = False  # True: the workers share the node's network
    uid_base: int = DEFAULT_UID_BASE
    as_root: bool = False  # a root node's workers run as root, on purpose (a container)


@dataclass(frozen=True)
class Plan:
    """What one worker process does to itself before task code can run (see the docstring)."""

    subreaper: bool = True
    oom_score: bool = True
    network: str = "own"  # "own": a namespace of its own; "user": one inside a user namespace;
    # "shared": the node's network
    memory: int | None = None
    open_files: int | None = None
    processes: int | None = None
    uid: int | None = None  # None: the node's own
    group: int | None = None
    no_new_privs: bool = True
    readable: tuple[str, ...] = field(default=())  # the probe checks the uid can read these

    def to_arg(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_arg(cls, text: str) -> Plan:
        fields = json.loads(text)
        fields["readable"] = tuple(fields.get("readable", ()))
        return cls(**fields)


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1.5G``, ``100000`` (bytes) -> bytes; argparse's ``type`` for sizes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if found is None:
        raise ValueError(f"not a size: {text!r} (say 512M or 2G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[found[2]]
    return int(float(found[1]) * scale)


# --- in the worker's own process --------------------------------------------


#: This process entered a network namespace of its own (loopback only): a task's network
#: errors here get a note saying so (serialize.describe_failure).
own_network = False


def enter(plan: Plan, *, strict: bool = True) -> dict[str, str]:
    """Apply ``plan`` to this process (single-threaded, before task code). Strict: raise
    ``ContainmentFailed`` at the first measure that fails; else return {measure: reason}."""
    refused: dict[str, str] = {}

    def attempt(measure: str, step: Any) -> None:
        try:
            step()
        except (OSError, ValueError) as exc:
            if strict:
                raise ContainmentFailed(measure, _reason(exc)) from None
            refused[measure] = _reason(exc)

    if plan.subreaper:
        attempt("subreaper", lambda: _prctl(_PR_SET_CHILD_SUBREAPER, 1))
    if plan.oom_score:
        attempt("oom_score", _raise_oom_score)
    if plan.network != "shared":
        attempt("network", lambda: _own_network(user_namespace=plan.network == "user"))
        global own_network
        own_network = "network" not in refused
    if plan.memory is not None:
        attempt("memory", lambda: _limit(resource.RLIMIT_DATA, plan.memory))
    if plan.open_files is not None:
        attempt("open_files", lambda: _limit(resource.RLIMIT_NOFILE, plan.open_files))
    if plan.processes is not None:
        attempt("processes", lambda: _limit(resource.RLIMIT_NPROC, plan.processes))
    if plan.uid is not None:
        attempt("uid", lambda: _become(plan.uid, plan.group, plan.readable))
    if plan.no_new_privs:
        attempt("no_new_privs", lambda: _prctl(_PR_SET_NO_NEW_PRIVS, 1))
    return refused


def contain_or_exit(plan: Plan) -> None:
    """``enter(plan)``, or log why not and end this process (no task code runs uncontained)."""
    try:
        enter(plan)
    except ContainmentFailed as exc:
        logs.configure()
        structlog.get_logger("actors.worker").error(
            "worker_containment_failed", measure=exc.measure, reason=exc.reason)
        sys.stderr.flush()
        os._exit(71)


def wipe_initial_environment() -> None:
    """A forked worker: zero the environment strings the node started with, which
    ``/proc/self/environ`` shows (``os.environ`` holds copies; call this after replacing it)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end: fields 50 and 51
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def _prctl(option: int, value: int) -> None:
    if _libc is None:
        raise OSError(0, "not Linux")
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
        return
    if _libc is None:
        raise OSError(0, "not Linux")
    if _libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _raise_oom_score() -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def _own_network(*, user_namespace: bool) -> None:
    """A network namespace of this process's own, its loopback up. Not root: inside a user
    namespace mapping this uid and gid to themselves."""
    if user_namespace:
        uid, gid = os.getuid(), os.getgid()
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _unshare(_CLONE_NEWNET)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack(_IFREQ, fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def _limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if os.geteuid() != 0 and hard != resource.RLIM_INFINITY:
        value = min(value, hard)  # an unprivileged process cannot raise its hard limit
    resource.setrlimit(which, (value, value))


def _become(uid: int, group: int | None, readable: tuple[str, ...]) -> None:
    os.setgroups([group] if group is not None else [])
    os.setgid(uid)
    os.setuid(uid)
    # A change of uid makes the process undumpable: its /proc files root's, its own environ
    # unreadable to it. Only processes of its own uid (the task's) may look at it again.
    _prctl(_PR_SET_DUMPABLE, 1)
    for path in readable:
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(13, f"uid {uid} cannot read {path} ({_blocker(path)})")


def _blocker(path: str) -> str:
    """The first folder on ``path``'s way that others may not enter, as ``ls`` would say it."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        step = os.sep.join(parts[:i]) or os.sep
        with contextlib.suppress(OSError):
            mode = os.stat(step).st_mode
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                return f"{step} is {stat.filemode(mode)}"
    return "permission denied"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if not exc.filename else f"{exc.strerror}: {exc.filename}"
    return str(exc)


# --- in the node ------------------------------------------------------------


class Containment:
    """The node's side: which measures this host allows, and the uids its workers take."""

    def __init__(self, limits: Limits, base: Plan, uids: list[int], locks: list[int],
                 refused: dict[str, str]) -> None:
        self.limits = limits
        self.base = base  # every worker's plan, less its uid
        self.refused = refused
        self._free = list(uids)
        self._locks = locks

    @classmethod
    def start(cls, limits: Limits, slots: int, log: Any) -> Containment:
        """Claim uids, probe what the kernel allows, log each refusal once. Call before any
        thread starts (the probe forks)."""
        refused: dict[str, str] = {}
        if not sys.platform.startswith("linux"):
            log.warning("worker_containment_unavailable", reason=f"not Linux ({sys.platform})")
            return cls(limits, Plan(subreaper=False, oom_score=False, network="shared",
                                    no_new_privs=False), [], [], {"all": "not Linux"})
        root = os.geteuid() == 0
        uids: list[int] = []
        locks: list[int] = []
        if root and limits.as_root:
            refused["uid"] = "asked to (--worker-as-root)"
            refused["processes"] = ("the kernel counts processes per uid, and workers share "
                                    "the node's (--worker-as-root)")
        elif root:
            try:
                uids, locks = claim_uids(limits.uid_base, slots)
            except OSError as exc:
                refused["uid"] = _reason(exc)
        else:
            refused["uid"] = "the node is not root"
        base = Plan(
            network="shared" if limits.network else ("own" if root else "user"),
            memory=limits.memory, open_files=limits.open_files,
            processes=limits.processes if uids else None,
            group=limits.uid_base if uids else None,
            readable=_interpreter_paths() if uids else (),
        )
        probed = probe(replace(base, uid=uids[0] if uids else None))
        if "uid" in probed:
            for lock in locks:
                os.close(lock)
            uids, locks = [], []
            base = replace(base, group=None, readable=(), processes=None)
            refused.setdefault("processes", "the kernel counts processes per uid, and workers "
                                            "share the node's")
        refused.update(probed)
        if "all" in refused:
            base = Plan(subreaper=False, oom_score=False, network="shared", no_new_privs=False)
        if "network" in refused:
            base = replace(base, network="shared")
        # What the kernel refused is left out: a limit as None, a switch as False.
        off: dict[str, Any] = {measure: None if measure in ("memory", "open_files", "processes")
                               else False for measure in refused
                               if measure in ("subreaper", "oom_score", "memory", "open_files",
                                              "processes", "no_new_privs")}
        base = replace(base, **off)
        for measure, reason in sorted(refused.items()):
            # Not being root is how most nodes run, and the process limit follows the uid's
            # fate: said, but not as a warning.
            quiet = measure == "processes" or (measure == "uid" and (not root or limits.as_root))
            hint = {} if quiet or measure != "uid" else {"hint": (
                "workers run tasks as root meanwhile: install Python and this package where "
                "other users may read them (not under /root), or run the node as a user; "
                "where root is meant (a container), --worker-as-root or "
                "$ACTORS_WORKER_AS_ROOT=1 says so")}
            (log.info if quiet else log.warning)(
                "worker_containment_refused", measure=measure, reason=reason, **hint)
        return cls(limits, base, uids, locks, refused)

    @property
    def group(self) -> int | None:
        return self.base.group

    def plan(self) -> Plan:
        """A worker's plan, with a uid of its own when the node has one free."""
        if self.base.group is None:
            return self.base
        if not self._free:
            raise ContainmentFailed("uid", "every claimed uid is in use")
        return replace(self.base, uid=self._free.pop(0), readable=())

    def release(self, plan: Plan) -> None:
        """The worker that had ``plan`` is gone, and with it every process of its uid."""
        if plan.uid is not None and self.base.group is not None:
            self._free.append(plan.uid)

    def prepare_run_dir(self, run_dir: str) -> None:
        """Workers of their own uids pass through the run folder (to the ipc socket, the package
        cache, their scratch folder) but do not list it; files made in it belong to the group."""
        if self.group is not None:
            os.chown(run_dir, 0, self.group)
            os.chmod(run_dir, 0o2710)

    def prepare_scratch(self, scratch: str, plan: Plan) -> None:
        if plan.uid is not None:
            os.chown(scratch, plan.uid, plan.uid)
        os.chmod(scratch, 0o700)

    def close(self) -> None:
        for lock in self._locks:
            with contextlib.suppress(OSError):
                os.close(lock)
        self._locks = []


def probe(plan: Plan) -> dict[str, str]:
    """Try ``plan`` in a forked child; {measure: why the kernel refused it}. Single-threaded only."""
    read, write = os.pipe()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(read)
            os.write(write, json.dumps(enter(plan, strict=False)).encode())
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not answer:
        return {"all": f"the probe failed (status {status})"}
    refused: dict[str, str] = json.loads(answer)
    return refused


def claim_uids(base: int, count: int) -> tuple[list[int], list[int]]:
    """``count`` uids in (base, base + UID_SPAN) that no account and no other node has: each held
    by a lock file for as long as its descriptor is open (the node's life)."""
    if base < 1 or base + UID_SPAN > 2**31 - 2:
        raise OSError(22, f"uid base {base} out of range")
    os.makedirs(UID_LOCKS, mode=0o700, exist_ok=True)
    info = os.lstat(UID_LOCKS)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise OSError(1, f"{UID_LOCKS} is not a folder only root may write")
    uids: list[int] = []
    locks: list[int] = []
    for uid in range(base + 1, base + UID_SPAN):
        if len(uids) == count:
            break
        if uid == os.getuid() or _has_account(uid):
            continue
        fd = os.open(os.path.join(UID_LOCKS, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        uids.append(uid)
        locks.append(fd)
    if len(uids) < count:
        for fd in locks:
            os.close(fd)
        raise OSError(11, f"fewer than {count} free uids above {base}")
    return uids, locks


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _interpreter_paths() -> tuple[str, ...]:
    """What a worker of another uid must read: the interpreter, its libraries, this package."""
    paths = {sys.executable, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    paths.update(sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib"))
    return tuple(sorted(p for p in paths if p and os.path.exists(p)))


def reachable_by_others(path: str) -> bool:
    """Whether a process of another uid (in the node's worker group) may enter ``path``."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat(os.sep.join(parts[:i])).st_mode
        except OSError:
            return False
        if not mode & (stat.S_IXOTH | stat.S_IXGRP):
            return False
    return True


# --- a task's processes -----------------------------------------------------


def become_subreaper() -> bool:
    """The node: what its workers leave when they exit becomes its children, to be ended."""
    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        return False
    return True


def children_of(pid: int) -> list[int]:
    """``pid``'s children (zombies included), from ``/proc/<pid>/task/*/children``."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


def descendants_of(pid: int) -> list[int]:
    found: list[int] = []
    frontier = [pid]
    while frontier:
        below = [child for parent in frontier for child in children_of(parent)]
        found.extend(below)
        frontier = below
    return found


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def end_descendants(pid: int) -> int:
    """SIGKILL every process below ``pid`` (a subreaper: nothing below it escapes it), again
    while any forks as it dies. Returns how many were killed; they stay zombies until reaped."""
    killed: set[int] = set()
    for _ in range(SWEEP_ROUNDS):
        living = [p for p in descendants_of(pid) if p not in killed and not _is_zombie(p)]
        if not living:
            break
        for p in living:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
            killed.add(p)
    return len(killed)


def end_orphans(workers: set[int]) -> list[int]:
    """The node: SIGKILL its children that are not workers (what exited workers left, adopted by
    this subreaper) and everything below them. Returns them, to be reaped (``reap``)."""
    orphans = [p for p in children_of(os.getpid()) if p not in workers]
    for orphan in orphans:
        end_descendants(orphan)
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    return orphans


def reap(pids: list[int]) -> list[int]:
    """Reap those of ``pids`` that have exited; returns the ones still running."""
    left = []
    for pid in pids:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done == 0:
            left.append(pid)
    return left


# --- run folders ------------------------------------------------------------


#: The longest path a Unix socket may have here (``sun_path`` holds 108 bytes with its NUL).
MAX_SOCKET_PATH = 100
# A run folder holds Unix sockets (a node's workers.sock and peers/data, a LocalCluster's
# master.sock): room for the folder's own name and the longest of them.
SOCKET_ROOM = 48
SHORT_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")


def run_dir_root() -> str:
    """Where run folders go: the temporary folder, unless it is too long for the sockets in
    them (a long ``$TMPDIR``: a node could not bind its workers' socket and never started);
    then the first of ``SHORT_ROOTS`` this process may write in."""
    root = tempfile.gettempdir()
    if len(os.fsencode(root)) + SOCKET_ROOM <= MAX_SOCKET_PATH:
        return root
    for short in SHORT_ROOTS:
        if os.path.isdir(short) and os.access(short, os.W_OK | os.X_OK):
            return short
    return root  # nowhere shorter: the socket's bind says why


def make_run_dir(prefix: str) -> tuple[str, int]:
    """A private temporary folder ``<prefix><pid>-<random>``, locked (a descriptor, held for
    this process's life) before it takes its name, so no other start mistakes it for stale."""
    hidden = tempfile.mkdtemp(prefix=f".{prefix}{os.getpid()}-", dir=run_dir_root())
    fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path = os.path.join(os.path.dirname(hidden), os.path.basename(hidden)[1:])
    os.rename(hidden, path)
    return path, fd


def remove_stale_run_dirs(prefix: str) -> list[str]:
    """Remove ``<prefix><pid>-*`` folders whose lock nobody holds: their process is gone."""
    removed: list[str] = []
    pattern = re.compile(re.escape(prefix) + r"\d+-")
    root = run_dir_root()
    try:
        names = [n for n in os.listdir(root) if pattern.match(n)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # held: its process lives
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed
