"""A node's process: ``python -m actors.node --master tcp://HOST:PORT``, this host's workers for
a master on another host (or a master's own local node, when it runs as a process of its own:
``--local-node process``). Its parts (node_parts.py) on a hub of its own, a DEALER to its master;
the Node actor itself is node_actor.py."""

from __future__ import annotations

import threading

import pykka
import structlog

from actors import logs
from actors.errors import ActorsError
from actors.forking import exit_now
from actors.launch import default_keys_dir, parent_pid, refuse, run_noting_exit, stop_on_signals
from actors.node_parts import NodeParts, node_parser, settle
from transport import Hub

log = structlog.get_logger("actors.node")


def main(argv: list[str] | None = None) -> int:
    """The node's command line. A master's local node given ``--exit-note PATH`` writes there
    why it ended when it fails (its arguments refused, its keys unreadable, a crash), so that
    the master can tell its clients rather than have them wait for workers that never come."""
    return run_noting_exit(_main, argv)


def _main(argv: list[str], refused: list[str]) -> int:
    parent = parent_pid()  # whose end ends this node (--exit-with-parent): first of all
    args = node_parser(refused).parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    if not settle(args, refused):
        return 2
    parts = NodeParts(args, parent, args.master)
    try:
        parts.load_keys(args.keys or default_keys_dir())
    except ActorsError as exc:
        refuse(refused, "bad_keys", str(exc))
        parts.give_up()
        return 2
    hub = Hub(parts.on_frames, on_event=parts.on_event, on_tick=parts.on_tick, tick_s=0.25)
    try:
        parts.add_to(hub)
    except ValueError as exc:
        refuse(refused, "bad_data_address", str(exc))
        parts.give_up()
        return 2
    try:
        with parts.sockets_made():
            hub.start()
    except Exception as exc:
        master = args.local_master or args.master
        refuse(refused, "cannot_connect", f"{master}: {exc}", master=master)
        parts.give_up()
        return 2
    parts.bound(hub)
    stop = threading.Event()
    fatal: list[str] = []
    stop_on_signals(stop)

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        stop.set()

    parts.start(hub, on_fatal)
    stop.wait()
    parts.shutdown()
    pykka.ActorRegistry.stop_all(timeout=5)
    hub.stop()  # sends what the actors handed over before it, the last Bye included
    parts.close()
    if fatal:
        log.error("node_exiting", reason=fatal[0])
        refused.append(fatal[0])
        return 1
    return 0


if __name__ == "__main__":
    exit_now(main())
