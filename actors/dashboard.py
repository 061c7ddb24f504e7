"""The dashboard: a live page served by the master process (``--dashboard HOST:PORT``).

Theory of operation
-------------------
1. The HTTP threads never read the scheduler. The Master actor builds the page's data on its
   tick (``actors/watch.py``), encodes it to JSON once, and hands the bytes over with
   ``publish``; a request is answered with the latest bytes. The only state the two sides share
   is this object's, behind one lock: the published bytes, and when a viewer last asked.
2. Nobody watching costs nothing. The actor builds a snapshot only while ``wanted``: a viewer
   asked within ``WANTED_S``. A request that finds no snapshot newer than ``FRESH_S`` waits
   (at most ``WAIT_S``) for the next one, so a page opened after a quiet spell never shows
   stale numbers.
3. A task's page is asked for by id (``/api/task/ID``): the actor adds the details of the few
   tasks asked for lately (``MAX_WATCHED``) to the next snapshot.
4. Access needs the token printed at start (``?token=``), which the first page load also sets
   as a cookie (``HttpOnly``, ``SameSite=Strict``, one name per port: cookies do not tell
   ports apart); anything else gets 403. The page is static (``actors/static``), renders data
   with ``textContent`` only, and is served with a Content-Security-Policy that allows no
   script but its own file.
5. Live updates: the page polls ``/api/state`` once a second. Each poll is a short, complete
   request, so no thread is parked per viewer, a master restart needs no reconnect logic, and
   the tick-built snapshot cannot change faster anyway.

The server is the standard library's ``ThreadingHTTPServer``: no new dependency for a handful
of viewers on localhost (``prometheus_client``'s ``/metrics`` server is the same).
"""

from __future__ import annotations

import hmac
import secrets
import socket
import threading
import time
from http import cookies
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import structlog

from actors.errors import InvalidAddress
from actors.http_bound import REQUEST_TIMEOUT_S, Bounded

log = structlog.get_logger("actors.dashboard")

WANTED_S = 5.0  # the actor builds snapshots while a viewer asked this recently
FRESH_S = 1.5  # a snapshot older than this is waited on, not served
WAIT_S = 3.0
MAX_WATCHED = 8  # task pages built at once
BUILD_EVERY_S = 1.0  # the actor's pace while watched (the page polls once a second)
CLOSE_POKES = 20  # connections close() makes to wake the serving loop (see close)
STATIC = {"/": ("dashboard.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
          "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1; port 0: a free one)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise InvalidAddress(text, "the port is not a number") from None
    if not 0 <= number < 65536:
        raise InvalidAddress(text, "the port is out of range")
    return host, number


class Dashboard:
    """The HTTP server and what the Master actor hands it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self._lock = threading.Condition()
        self._state = b""  # the latest overview, JSON
        self._built = 0.0  # when (monotonic)
        self._details: dict[str, bytes] = {}  # task id -> its page's JSON, in the latest snapshot
        self._asked = 0.0  # when a viewer last asked (monotonic)
        self._watched: dict[str, float] = {}  # task id -> when its page was last asked for
        # The page's files, read at the first request for one (not on the master's start:
        # importlib.resources and the reads took ~6 ms of a LocalCluster's first result).
        self._files: dict[str, tuple[bytes, str]] | None = None
        server = _Server6 if ":" in host else _Server
        self._server = server((host, port), _handler(self))
        self.port = self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/?token={quote(self.token)}"
        self.cookie = f"actors_dashboard_{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard",
                                        daemon=True)
        self._thread.start()

    def static_file(self, path: str) -> tuple[bytes, str]:
        """One of the page's files (``STATIC``), with its content type; all of them are read
        at the first call (any of the server's threads)."""
        with self._lock:
            if self._files is None:
                self._files = {
                    name_path: (resources.files("actors").joinpath("static", name).read_bytes(),
                                kind) for name_path, (name, kind) in STATIC.items()}
            return self._files[path]

    # --- the actor's side -------------------------------------------------------

    def wanted(self, now: float) -> bool:
        """Whether a viewer asked within ``WANTED_S`` (``now``: time.monotonic()). Read on every
        tick without the lock: one float, written whole under it; a tick late is harmless."""
        return now - self._asked < WANTED_S

    def watched(self, now: float) -> list[str]:
        """The tasks whose pages were asked for lately, newest first."""
        with self._lock:
            for task_id in [t for t, when in self._watched.items() if now - when > WANTED_S]:
                del self._watched[task_id]
            return sorted(self._watched, key=self._watched.__getitem__, reverse=True)

    def publish(self, state: bytes, details: dict[str, bytes]) -> None:
        with self._lock:
            self._state, self._details = state, details
            self._built = time.monotonic()
            self._lock.notify_all()

    def close(self) -> None:
        """Stop serving. ``shutdown`` waits for the serving loop to see its stop flag, which it
        looks at every half second, or when a connection wakes it: a connection of its own
        wakes it now (every cluster's close took half a second more than it needed)."""
        stopper = threading.Thread(target=self._server.shutdown, name="dashboard-stop",
                                   daemon=True)
        stopper.start()
        host, port = self._server.server_address[:2]
        for _ in range(CLOSE_POKES):
            stopper.join(0.005)
            if not stopper.is_alive():
                break
            try:  # (a poke that beats the flag is served as an empty request: harmless)
                socket.create_connection((str(host), int(port)), timeout=0.5).close()
            except OSError:
                break  # it waits for its next look, at most half a second
        stopper.join()
        self._server.server_close()

    # --- the HTTP threads' side ------------------------------------------------

    def _fresh(self, task_id: str | None = None) -> bytes | None:
        """The latest snapshot (or a task's page in it), waiting for a fresh one if needed."""
        deadline = time.monotonic() + WAIT_S
        with self._lock:
            self._asked = time.monotonic()
            if task_id is not None:
                self._watched[task_id] = self._asked
                while len(self._watched) > MAX_WATCHED:
                    del self._watched[min(self._watched, key=self._watched.__getitem__)]

            def ready() -> bool:
                if time.monotonic() - self._built > FRESH_S:
                    return False
                return task_id is None or task_id in self._details

            self._lock.wait_for(ready, timeout=max(0.0, deadline - time.monotonic()))
            if task_id is None:
                return self._state or None
            return self._details.get(task_id)

    def _allowed(self, query: dict[str, list[str]], cookie_header: str | None) -> bool:
        given = query.get("token", [""])[0]
        if not given and cookie_header:
            jar = cookies.SimpleCookie()
            try:
                jar.load(cookie_header)
            except cookies.CookieError:
                return False
            morsel = jar.get(self.cookie)
            given = morsel.value if morsel is not None else ""
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())


class _Server(Bounded, HTTPServer):
    pass


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler(board: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pydra-actors-dashboard"
        sys_version = ""
        timeout = REQUEST_TIMEOUT_S  # a connection that sends nothing lets its thread go
        # (its answer waits up to WAIT_S more)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if not board._allowed(query, self.headers.get("Cookie")):
                self._send(403, b"403: this page needs the token the master printed at start "
                                b"(http://HOST:PORT/?token=...)\n", "text/plain; charset=utf-8")
                return
            extra = []
            if "token" in query:  # later requests (the script, the polls) carry the cookie
                extra.append(("Set-Cookie", f"{board.cookie}={board.token}; Path=/; HttpOnly; "
                                            "SameSite=Strict"))
            if url.path in STATIC:
                body, kind = board.static_file(url.path)
                self._send(200, body, kind, extra)
            elif url.path == "/api/state":
                state = board._fresh()
                if state is None:
                    self._send(503, b'{"error": "no snapshot yet"}', "application/json", extra)
                else:
                    self._send(200, state, "application/json", extra)
            elif url.path.startswith("/api/task/") and 0 < len(url.path) - 10 <= 200:
                detail = board._fresh(url.path[len("/api/task/"):])
                if detail is None:
                    self._send(503, b'{"error": "not built yet"}', "application/json", extra)
                else:
                    self._send(200, detail, "application/json", extra)
            else:
                self._send(404, b"404: not found\n", "text/plain; charset=utf-8", extra)

        def _send(self, status: int, body: bytes, kind: str,
                  headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")  # the token is in the URL
            self.send_header("Content-Security-Policy", POLICY)
            for name, value in headers or ():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            # Never the URL: it may hold the token.
            log.debug("dashboard_request", client=self.address_string(),
                      status=args[1] if len(args) > 1 else "")

    return Handler
