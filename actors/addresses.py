"""Master addresses as users write them: ``HOST:PORT`` or ``tcp://HOST:PORT`` (and, for a client
on the master's host, ``ipc://PATH``)."""

from __future__ import annotations

import os
import re
import socket
import stat

from actors.errors import InvalidAddress

_HOST_PORT = re.compile(r"^(?:tcp://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\[\]\s]+):(?P<port>\d+)$")


def master_address(address: str) -> str:
    """The ZeroMQ endpoint ``tcp://HOST:PORT`` of ``address``; ``InvalidAddress`` otherwise."""
    if not isinstance(address, str):
        raise InvalidAddress(repr(address), f"an address is a string, not {type(address).__name__}")
    text = address.strip()
    found = _HOST_PORT.match(text)
    if found is None:
        scheme = text.partition("://")[0] if "://" in text else ""
        if scheme and scheme != "tcp":
            reason = f"the scheme {scheme}:// is not supported (masters listen on tcp)"
        elif not text.rpartition(":")[2].isdigit() or text.endswith("]"):
            reason = "it has no port"
        else:
            reason = "it is not of the form HOST:PORT"
        raise InvalidAddress(address, reason)
    port = int(found["port"])
    if not 1 <= port <= 65535:
        raise InvalidAddress(address, f"port {port} is not between 1 and 65535")
    return f"tcp://{found['host']}:{port}"


def client_address(address: str) -> str:
    """What a client connects to: a master's TCP address (``master_address``), or on the
    master's host the ``ipc://PATH`` of its ``--local-socket``; ``InvalidAddress`` otherwise."""
    text = address.strip() if isinstance(address, str) else ""
    if text.startswith("ipc://"):
        path = text[len("ipc://"):]
        if not path.startswith("/"):
            raise InvalidAddress(address, "an ipc:// address is an absolute path (the master's "
                                          "--local-socket)")
        # (TCP cannot tell so soon that no master is there; a Unix socket can)
        if not stat.S_ISSOCK(_mode(path)):
            raise InvalidAddress(address, "no Unix socket is there (a master's --local-socket, "
                                          "on this host)")
        if probe_unix_socket(path) == STALE:
            raise InvalidAddress(address, "no master listens on that socket any more")
        return text
    return master_address(address)


LISTENING, STALE = "listening", "stale"


def probe_unix_socket(path: str) -> str:
    """Whether a process listens on the Unix socket at ``path`` (``LISTENING``), none does any
    more (``STALE``: the file a process killed outright leaves), or what else a connect met."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return STALE
        except OSError as exc:
            return exc.strerror or str(exc)
    return LISTENING


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0
