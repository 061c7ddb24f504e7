"""``python -m actors``: keys, package listings, a cluster's state, and ``ssh`` (a master here
and nodes over ssh, in ``actors.ssh_launch``). The master and the node have their own ``main()``
in ``actors.master`` and ``actors.node``, on top of ``actors.launch``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import msgspec

from actors import logs, ssh_launch
from actors.errors import ActorsError
from actors.launch import default_keys_dir, master_arg
from actors.messages import OutputLine
from transport import init_keys
from transport.keys import add_key

# --- python -m actors ... ---------------------------------------------------


def _to_a_master(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a command that asks a running master."""
    command.add_argument("--master", default=os.environ.get("ACTORS_ADDRESS"), type=master_arg,
                         help="the master's address, HOST:PORT or tcp://HOST:PORT "
                              "(default $ACTORS_ADDRESS, as a --run script has it)")
    command.add_argument("--keys", default=None,
                         help="CURVE key directory (default $ACTORS_KEYS, else ~/.pydra-actors/keys)")
    command.add_argument("--timeout", type=float, default=10.0,
                         help="seconds to wait for the master's answer")
    return command


def actors_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors", description="pydra-actors tools")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="CURVE keys").add_subparsers(dest="keys_command", required=True)
    init = keys.add_parser("init", help="create master, node and client key pairs and the allow-list")
    init.add_argument("directory")
    init.add_argument("--overwrite", action="store_true")
    add = keys.add_parser("add", help="a key pair for one more node or client, admitted in its role")
    add.add_argument("directory", help="the key directory the master uses")
    add.add_argument("name", help="the new peer's name (letters, digits, - and _)")
    add.add_argument("--role", required=True, choices=["node", "client"])
    _to_a_master(sub.add_parser("packages", help="list the master's deployed task packages"))
    status = _to_a_master(sub.add_parser("status", help="a running cluster: its nodes, workers "
                                                        "and tasks"))
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    tasks = _to_a_master(sub.add_parser("tasks", help="the tasks submitted with this key, "
                                                      "newest first"))
    tasks.add_argument("--json", action="store_true", help="a JSON list, for scripts")
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    for name, what in (("cancel", "cancel a task submitted with this key"),
                       ("story", "a task's story: each change of it and its units, and why"),
                       ("logs", "what a task printed and logged (the master keeps its last "
                                "1,000 lines)")):
        command = _to_a_master(sub.add_parser(name, help=what))
        command.add_argument("task_id", metavar="ID", help="the task's id (see `tasks`)")
        command.add_argument("--json", action="store_true", help="JSON, for scripts")
        if name == "logs":
            command.add_argument("--limit", type=int, default=1000,
                                 help="the newest this many lines (default 1000)")
        if name == "cancel":
            command.add_argument("--grace", type=float, default=5.0,
                                 help="seconds its running code has to stop before its worker "
                                      "is killed (default 5; 0: at once)")
    ssh = sub.add_parser("ssh", help="start a master here and a node on each HOST over ssh, "
                                      "with the keys handed over; Ctrl-C stops them all")
    ssh_launch.add_arguments(ssh)
    args = parser.parse_args(argv)
    if getattr(args, "master", "") is None:
        parser.error(f"{args.command}: which master? give --master HOST:PORT, or set "
                     "$ACTORS_ADDRESS")
    if args.command == "ssh":
        wrong = ssh_launch.check_arguments(args)
        if wrong is not None:
            ssh.error(wrong)  # exits 2, before anything starts
        return ssh_launch.main(args)
    if args.command in ("cancel", "story", "logs"):
        return _about_a_task(args)
    if args.command == "tasks":
        return _print_tasks(args.master, args.keys or default_keys_dir(), args.json, args.limit,
                            args.timeout)
    if args.command == "packages":
        return _print_packages(args.master, args.keys or default_keys_dir(), args.timeout)
    if args.command == "status":
        return _print_status(args.master, args.keys or default_keys_dir(), args.json, args.timeout)
    if args.command == "keys" and args.keys_command == "add":
        try:
            folder = add_key(args.directory, args.role, args.name)
        except ActorsError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        sys.stdout.write(
            f"admitted a new {args.role} key as allowed/{args.role}-{args.name}.key\n"
            f"  hand {folder} to that {args.role} (its keys directory: --keys {folder})\n")
        return 0
    if args.command == "keys" and args.keys_command == "init":
        try:
            root = init_keys(args.directory, overwrite=args.overwrite)
        except ActorsError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        sys.stdout.write(
            f"created CURVE keys in {root}\n"
            f"  master: {root}/master.key_secret (keep it on the master host)\n"
            f"  nodes and clients: copy {root}/master.key and their own *.key_secret\n"
            f"  allow-list: {root}/allowed/ (public keys the master admits)\n"
        )
    return 0


def _print_packages(address: str, keys: str, timeout: float) -> int:
    from actors.client import Client

    logs.configure("auto", "WARNING")
    try:
        with Client(address, keys=keys, timeout=timeout) as client:
            listing = client.packages(timeout)
    except ActorsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if not listing:
        sys.stdout.write("no packages deployed\n")
    for package in listing:
        sys.stdout.write(f"{package.package}  version {package.version}\n")
        for task in package.tasks:
            params = ", ".join(task.parameters) if task.parameters is not None else "..."
            ran = (time.strftime("last run %Y-%m-%d %H:%M:%S", time.localtime(task.last_run))
                   if task.last_run else "never run")
            sys.stdout.write(f"  {task.name}({params})  [{task.kind}]  {ran}  {task.doc}\n")
        for module, error in package.broken:
            sys.stdout.write(f"  BROKEN {module}: {error}\n")
    return 0


def _print_status(address: str, keys: str, as_json: bool, timeout: float) -> int:
    from actors.client import Client

    logs.configure("auto", "WARNING")
    try:
        with Client(address, keys=keys, timeout=timeout) as client:
            info = client.info(timeout)
            packages = client.packages(timeout)
    except (ActorsError, TimeoutError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if as_json:
        sys.stdout.write(json.dumps({
            "address": address, "master_id": info.master_id, "epoch": info.epoch,
            "version": info.version, "tasks": {"running": info.tasks_running,
                                               "queued": info.tasks_queued},
            "workers": {"total": info.workers, "idle": info.idle_workers},
            "nodes": [{"node": n, "host": h, "workers": w, "idle": i}
                      for n, h, w, i in info.node_workers],
            "packages": {p.package: p.version for p in packages},
        }, indent=2) + "\n")
        return 0
    out = [f"master {info.master_id} at {address} (pydra-actors {info.version}, epoch {info.epoch})",
           f"tasks: {info.tasks_running} running, {info.tasks_queued} queued",
           f"workers: {info.workers} ({info.idle_workers} idle) on {len(info.nodes)} nodes"]
    out += [f"  {node:<28} {host:<20} {workers} workers, {idle} idle"
            for node, host, workers, idle in info.node_workers]
    out += [f"package {p.package} version {p.version}" for p in packages]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _print_tasks(address: str, keys: str, as_json: bool, limit: int, timeout: float) -> int:
    from actors.client import Client

    logs.configure("auto", "WARNING")
    try:
        with Client(address, keys=keys, timeout=timeout) as client:
            listed = client.tasks(limit, timeout)
    except (ActorsError, TimeoutError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if as_json:
        sys.stdout.write(json.dumps([msgspec.structs.asdict(t) for t in listed], indent=2) + "\n")
        return 0
    if not listed:
        sys.stdout.write("no tasks submitted with this key\n")
    else:
        sys.stdout.write(f"{'TASK':<36} {'STATUS':<10} {'PROGRESS':>12} {'SUBMITTED':<8} "
                         f"{'TOOK':>8} PRIORITY\n")
    for t in listed:
        progress = f"{t.done}/{t.total}" if t.total else (f"{t.done}" if t.done else "")
        when = time.strftime("%H:%M:%S", time.localtime(t.submitted)) if t.submitted else "-"
        took = f"{t.ended - t.started:.1f}s" if t.ended and t.started else ""
        sys.stdout.write(f"{t.task_id:<36} {t.status:<10} {progress:>12} {when:<9} {took:>8} "
                         f"{t.priority}\n")
    return 0


def _about_a_task(args: argparse.Namespace) -> int:
    """``cancel``, ``story`` and ``logs`` of one task of the caller's key."""
    from actors.client import Client, check_grace

    logs.configure("auto", "WARNING")
    task_id: str = args.task_id
    try:
        if args.command == "cancel":
            check_grace(args.grace)  # before connecting: a bad --grace is a usage error
        with Client(args.master, keys=args.keys or default_keys_dir(),
                    timeout=args.timeout) as client:
            if args.command == "cancel":
                status = client.cancel_task(task_id, args.timeout, args.grace)
                doc: object = {"task_id": task_id, "status": status,
                               "cancelled": status == "cancelled"}
                text = (f"task {task_id} cancelled\n" if status == "cancelled" else
                        f"task {task_id} had already ended: {status}\n")
            elif args.command == "story":
                entries = client.story_of(task_id, args.timeout)
                doc = [{"key": k, "start": a, "finish": b, "cause": c, "time": t}
                       for k, a, b, c, t in entries]
                text = "".join(f"{_clock(t)}  {k:<14} {a:>10} -> {b:<10} {c}\n"
                               for k, a, b, c, t in entries) or f"task {task_id}: no story\n"
            else:
                lines, dropped = client.task_logs(task_id, args.limit, args.timeout)
                doc = {"task_id": task_id, "dropped": dropped,
                       "lines": [{"worker": w, **msgspec.structs.asdict(line)}
                                 for w, line in lines]}
                text = "".join(f"{_clock(line.time)} {w} {_source(line)}: {line.text}\n"
                               for w, line in lines)
                if dropped:
                    text += f"({dropped} earlier or dropped lines not shown)\n"
                if not lines and not dropped:
                    text = f"task {task_id}: no output kept\n"
    except (ActorsError, TimeoutError, ValueError) as exc:  # (ValueError: a bad --grace)
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else text)
    return 0


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"


def _source(line: OutputLine) -> str:
    """Where a line came from: its stream (a log record's level) and its unit, if any."""
    stream = line.level or line.stream
    return f"{stream} unit {line.unit}" if line.unit >= 0 else stream
