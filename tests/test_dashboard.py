"""The dashboard page, in a real browser (headless Chromium) against a real master and node, and
its token (plain HTTP)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from actors import Client, ParallelTask
from actors.dashboard import Dashboard
from tests.conftest import descendants, kill_all, start_master, wait_until

pytestmark = pytest.mark.processes

UNITS, STEP = 40, 10  # units of the gated job; a gate lets STEP of them finish


class Gated(ParallelTask):
    """Unit i finishes once the file ``gates/<i // 10>`` exists: the test says how far it gets.
    Each unit takes a little time, so that the scheduler sends them one a run and a finished
    unit is reported while the next one waits."""

    def get_work(self, gates, n):
        yield from ((gates, i) for i in range(n))

    def work_unit(self, unit):
        gates, i = unit
        deadline = time.monotonic() + 90
        while not os.path.exists(os.path.join(gates, str(i // STEP))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {i // STEP} never opened")
            time.sleep(0.01)
        time.sleep(0.02)
        print(f"unit {i} done")
        return i

    def reduce(self, results):
        return sum(results)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("these tests need Chromium: apt-get install chromium (.ci/run does)")
    return found


def browse(url: str, profile: Path, *extra: str) -> str:
    """Load ``url`` in headless Chromium, let its scripts run for 4 s of virtual time (network
    waits do not count), and return the DOM as they left it (or, with ``--screenshot=PATH``,
    take a picture instead)."""
    if not any(arg.startswith("--screenshot") for arg in extra):
        extra = (*extra, "--dump-dom")
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=4000", *extra,
         url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Page(HTMLParser):
    """The elements of a dumped DOM (tag, attributes), and the text inside each id'd element."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.elements.append((tag, found))
        if "id" in found:
            self._open.append(found["id"])
            self.text.setdefault(found["id"], "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "span", "h2", "svg", "main", "table") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for name in self._open:
            self.text[name] += data

    def all(self, tag: str, cls: str = "") -> list[dict[str, str]]:
        """The ``tag`` elements (of class ``cls``, if given)."""
        return [a for t, a in self.elements
                if t == tag and (not cls or cls in a.get("class", "").split())]


def dashboard_url(tmp_path: Path) -> str:
    return re.search(r"dashboard:\s+(\S+)", (tmp_path / "master.out").read_text())[1]


def test_the_page_shows_workers_a_running_task_and_its_progress_advancing(tmp_path: Path) -> None:
    master, address = start_master(tmp_path, "--workers", "2", "--keys", str(tmp_path / "keys"))
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        url = dashboard_url(tmp_path)
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        with Client(address, keys=tmp_path / "keys", timeout=60) as client:
            client.wait_for_workers(2, 60)
            job = client.submit(Gated, str(gates), UNITS)
            (gates / "0").touch()
            wait_until(lambda: job.progress() == (STEP, UNITS), 60, "the first units done")

            # What each worker process uses, as its node reports it every 2 s.
            state_url = url.replace("/?token=", "/api/state?token=")

            def workers_measured() -> bool:
                status, body, _ = get(state_url)
                rows = [w for n in json.loads(body)["nodes"] for w in n["workers"]]
                return status == 200 and len(rows) == 2 and all(
                    (w["rss"] or 0) > 1 << 20 and w["cpu"] is not None for w in rows)

            wait_until(workers_measured, 30, "each worker's CPU and memory in the page's data")
            page = Page(browse(url, tmp_path / "profile"))
            workers = page.all("tr", "worker")
            assert len(workers) == 2 and {w["data-state"] for w in workers} == {"busy"}
            memory = page.all("td", "rss")
            assert len(memory) == 2 and all(int(td["data-rss"]) > 1 << 20 for td in memory)
            [row] = [r for r in page.all("tr", "task") if r["data-task"] == job.task_id]
            assert (row["data-status"], row["data-done"], row["data-total"]) == (
                "running", str(STEP), str(UNITS))
            [bar] = [p for p in page.all("progress") if p.get("max") == str(UNITS)]
            assert bar["value"] == str(STEP)
            stream = page.all("rect", "bar")
            assert sum(1 for r in stream if r["data-task"] == job.task_id) >= STEP
            assert page.text["live"] == "live"

            # What a person sees mid-way (look at it: tests/README says where it is kept).
            shot = tmp_path / "dashboard.png"
            browse(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000")
            assert shot.stat().st_size > 10_000

            # Its page: the story so far and what its units printed.
            task_page = Page(browse(url + f"#task/{job.task_id}", tmp_path / "profile"))
            assert "unit 0 done" in task_page.text["output"]
            assert task_page.text["master"].startswith("master ")  # (it said "connecting..")
            assert "queued" in task_page.text["story"] and "running" in task_page.text["story"]
            [facts] = page_rows(task_page, job.task_id)
            assert facts["data-status"] == "running"

            (gates / "1").touch()
            (gates / "2").touch()
            wait_until(lambda: job.progress()[0] >= 3 * STEP, 60, "more units done")

            def page_data_shows_them() -> bool:  # (the page serves a snapshot up to 1.5 s old)
                status, body, _ = get(state_url)
                rows = [t for t in json.loads(body)["tasks"] if t["id"] == job.task_id]
                return status == 200 and bool(rows) and rows[0]["done"] >= 3 * STEP

            wait_until(page_data_shows_them, 30, "the page's data to show them")
            later = Page(browse(url, tmp_path / "profile"))
            [row] = [r for r in later.all("tr", "task") if r["data-task"] == job.task_id]
            assert row["data-status"] == "running" and int(row["data-done"]) >= 3 * STEP

            (gates / "3").touch()
            assert job.result(timeout=60) == sum(range(UNITS))

            def shows_it_done() -> bool:
                last = Page(browse(url, tmp_path / "profile"))
                # (The throughput chart draws a line once the master has sampled a few seconds.)
                return (("done", str(UNITS)) in [(r["data-status"], r["data-done"])
                                                 for r in page_rows(last, job.task_id)]
                        and bool(last.all("polyline", "units")))

            wait_until(shows_it_done, 60, "the page to show the task done, and the throughput")
    finally:
        kill_all({master.pid} | descendants(master.pid))
        master.wait(10)


def page_rows(page: Page, task_id: str) -> list[dict[str, str]]:
    return [r for r in page.all("tr", "task") if r["data-task"] == task_id]


def get(url: str, cookie: str = "") -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read(), dict(refused.headers)


def test_the_page_and_its_data_need_the_token(tmp_path: Path) -> None:
    master, _ = start_master(tmp_path, "--workers", "0", "--keys", str(tmp_path / "keys"))
    try:
        url = dashboard_url(tmp_path)
        base, token = url.split("/?token=")
        for path in ("/", "/api/state", "/api/task/x", "/dashboard.js", "/nothing"):
            assert get(base + path)[0] == 403, path
            assert get(f"{base}{path}?token=wrong{token}")[0] == 403, path
            assert get(base + path, cookie=f"actors_dashboard_0={token}")[0] == 403, path
        status, body, headers = get(url)
        assert status == 200 and b"<title>pydra-actors dashboard" in body
        port = base.rpartition(":")[2]
        assert headers["Set-Cookie"] == (f"actors_dashboard_{port}={token}; Path=/; HttpOnly; "
                                         "SameSite=Strict")
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        # After the first visit the cookie is enough: what the page's script and polls send.
        status, body, _ = get(f"{base}/api/state", cookie=f"actors_dashboard_{port}={token}")
        assert status == 200
        state = json.loads(body)
        assert state["master"]["id"].startswith("master-") and state["counts"]["workers"] == 0
        assert get(f"{base}/api/task/Nope-1?token={token}")[0] == 200
        assert "no task Nope-1" in json.loads(get(f"{base}/api/task/Nope-1?token={token}")[1])[
            "error"]
    finally:
        kill_all({master.pid})
        master.wait(10)


def test_dashboard_off_serves_nothing_and_a_bad_address_stops_the_master(tmp_path: Path) -> None:
    master, _ = start_master(tmp_path, "--workers", "0", "--keys", str(tmp_path / "keys"),
                             "--dashboard", "off")
    try:
        assert "dashboard:" not in (tmp_path / "master.out").read_text()
    finally:
        kill_all({master.pid})
        master.wait(10)
    bad = subprocess.run([sys.executable, "-m", "actors.master", "--port",
                          "0", "--workers", "0", "--keys", str(tmp_path / "keys"),
                          "--dashboard", "127.0.0.1:http", "--log-format", "json"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "cannot_serve_dashboard" in bad.stderr and "the port is not a number" in bad.stderr


def test_snapshots_are_wanted_only_while_someone_asks_and_a_stale_one_is_not_served() -> None:
    """The master builds the page's data only while a viewer asked lately (``wanted``); a viewer
    back after a quiet spell waits for a fresh snapshot instead of getting the old one."""
    board = Dashboard()
    try:
        assert not board.wanted(time.monotonic())
        board.publish(b'{"old": true}', {})
        board._built -= 60  # as if nobody had watched for a minute: the actor stopped building
        answers: list[tuple[int, bytes, dict[str, str]]] = []
        state_url = board.url.replace("/?token=", "/api/state?token=")
        asking = threading.Thread(target=lambda: answers.append(get(state_url)))
        asking.start()
        wait_until(lambda: board.wanted(time.monotonic()), 10, "the request to be seen")
        assert answers == []  # waiting for the actor's next snapshot
        board.publish(b'{"new": true}', {})
        asking.join(10)
        assert [(status, body) for status, body, _ in answers] == [(200, b'{"new": true}')]
    finally:
        board.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1"])
def test_a_closed_dashboard_serves_no_more_and_its_thread_has_ended(host: str) -> None:
    """close() wakes the serving loop with a connection of its own (on any address it was
    given, the wildcard included), so the loop ends; nothing listens on the port after."""
    board = Dashboard(host, 0)
    assert get(board.url)[0] == 200  # the page, served
    board.close()
    assert not board._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("::1" if ":" in host else "127.0.0.1", board.port), timeout=2)


@pytest.mark.parametrize("server", ["dashboard", "metrics"])
def test_the_servers_start_and_serve_without_looking_their_hosts_name_up(
        server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPServer's bind asked socket.getfqdn for a name nothing reads: a reverse DNS query on
    every master's start (as long as the resolver's timeouts where DNS does not answer). The
    metrics' WSGI environ still names the server (by its address)."""
    from actors.metrics import MetricsServer

    def no_dns(name: str = "") -> str:
        raise AssertionError(f"a DNS lookup of {name!r} at the server's start")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    board = Dashboard() if server == "dashboard" else MetricsServer("127.0.0.1", 0)
    try:
        wait_until(lambda: get(board.url)[0] == 200, 20, "the page to be served")
    finally:
        board.close()


@pytest.mark.parametrize("server", ["dashboard", "metrics"])
def test_idle_connections_hold_a_bounded_number_of_threads_and_the_page_is_served(
        server: str) -> None:
    """Anyone on the host may connect (the token is asked for with the request; the metrics
    ask none): connections that send nothing held a thread and a descriptor each, for good,
    until the master had no descriptor left for a client. A bounded number is served at
    once, the rest closed (http_bound.py), and a silent one is let go after a timeout."""
    from actors.http_bound import MAX_CONNECTIONS
    from actors.metrics import MetricsServer

    board = Dashboard() if server == "dashboard" else MetricsServer("127.0.0.1", 0)
    url = board.url
    idle: list[socket.socket] = []

    def serving() -> int:  # (the servers' threads: one a connection served)
        return sum("process_request_thread" in repr(getattr(t, "_target", ""))
                   for t in threading.enumerate())

    try:
        for _ in range(MAX_CONNECTIONS + 40):
            idle.append(socket.create_connection(("127.0.0.1", board.port), timeout=5))
        wait_until(lambda: serving() >= MAX_CONNECTIONS, 10, "connections served")
        with socket.create_connection(("127.0.0.1", board.port), timeout=10) as last:
            assert last.recv(1) == b""  # closed at once: every one before it was dealt with
        assert serving() == MAX_CONNECTIONS
        for sock in idle:
            sock.close()
        idle.clear()
        wait_until(lambda: get(url)[0] == 200, 20, "the page to be served again")
    finally:
        for sock in idle:
            sock.close()
        board.close()
