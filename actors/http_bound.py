"""HTTP servers of the master (the dashboard, the metrics endpoint) that anyone on their host
can connect to before any token is asked for: a bounded number served at once, and a
connection that sends nothing let go.

Without a bound, each idle connection held a thread and a descriptor of the master for good:
1,001 of them left it no descriptor, and a new client could not connect.

Bound without looking their host's name up: ``HTTPServer.server_bind`` asks
``socket.getfqdn`` for a name nothing here reads, a reverse DNS query (for ``0.0.0.0``, of
the machine's own name): as long as the resolver's timeouts, on a master's start, where DNS
does not answer."""

from __future__ import annotations

import threading
from socketserver import TCPServer, ThreadingMixIn
from typing import Any

MAX_CONNECTIONS = 64  # served at once (a page and its polls take a few); one more is closed
REQUEST_TIMEOUT_S = 10.0  # for a request to arrive (set as its handler's ``timeout``)


class Bounded(ThreadingMixIn):
    """A thread a connection, ``MAX_CONNECTIONS`` at most; mixed in before the server class."""

    daemon_threads = True  # a hung viewer never holds the master's exit
    request_queue_size = MAX_CONNECTIONS  # (5 by default: a burst waited on SYN retries)
    _room: threading.BoundedSemaphore | None = None

    def server_bind(self) -> None:
        """``HTTPServer.server_bind`` without its ``getfqdn``: the address stands for the name."""
        TCPServer.server_bind(self)  # type: ignore[arg-type]
        host, port = self.server_address[:2]  # type: ignore[attr-defined]
        self.server_name, self.server_port = str(host), port

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._room is None:
            self._room = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if not self._room.acquire(blocking=False):
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._room.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            assert self._room is not None
            self._room.release()
