"""Master addresses as users write them: ``HOST:PORT`` or ``tcp://HOST:PORT``."""

from __future__ import annotations

import re

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
