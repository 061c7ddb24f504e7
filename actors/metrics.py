"""``/metrics`` in Prometheus' text format, served beside the master (``--metrics HOST:PORT``).

The Master actor hands a snapshot (``Snapshot``) to this module on its tick; the HTTP thread
of ``prometheus_client`` reads only that snapshot, never the scheduler's state, so a scrape
never slows or races the scheduler. Counters count from the master's start.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from actors.errors import MissingDependency
from actors.http_bound import REQUEST_TIMEOUT_S, Bounded


@dataclass
class Snapshot:
    tasks: dict[str, int] = field(default_factory=dict)  # status -> tasks kept by the master
    queued_units: int = 0
    workers: dict[str, int] = field(default_factory=dict)  # idle / busy
    nodes: int = 0
    units_done: int = 0
    units_failed: int = 0
    tasks_submitted: int = 0
    worker_deaths: dict[str, int] = field(default_factory=dict)  # cause kind -> count
    handle_seconds: float = 0.0  # the scheduler's time in handle(), summed
    handled: int = 0  # events handled
    commit_seconds: float = 0.0  # the journal's commits, summed
    commits: int = 0
    dashboard_seconds: float = 0.0  # building the dashboard's snapshots, summed
    dashboard_builds: int = 0


class _Collector:
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot  # one reference, taken once: the actor replaces it whole
        tasks = GaugeMetricFamily("actors_tasks", "tasks the master keeps, by status",
                                  labels=["status"])
        for status, count in sorted(s.tasks.items()):
            tasks.add_metric([status], count)
        yield tasks
        workers = GaugeMetricFamily("actors_workers", "workers, by state", labels=["state"])
        for state, count in sorted(s.workers.items()):
            workers.add_metric([state], count)
        yield workers
        yield GaugeMetricFamily("actors_nodes", "nodes joined", value=s.nodes)
        yield GaugeMetricFamily("actors_queued_units", "units waiting for a worker",
                                value=s.queued_units)
        yield CounterMetricFamily("actors_units_done", "units finished well", value=s.units_done)
        yield CounterMetricFamily("actors_units_failed", "units that raised",
                                  value=s.units_failed)
        yield CounterMetricFamily("actors_tasks_submitted", "tasks submitted",
                                  value=s.tasks_submitted)
        deaths = CounterMetricFamily("actors_worker_deaths", "workers that died, by cause",
                                     labels=["cause"])
        for cause, count in sorted(s.worker_deaths.items()):
            deaths.add_metric([cause], count)
        yield deaths
        yield CounterMetricFamily("actors_scheduler_seconds",
                                  "time the scheduler spent handling events", value=s.handle_seconds)
        yield CounterMetricFamily("actors_scheduler_events", "events the scheduler handled",
                                  value=s.handled)
        yield CounterMetricFamily("actors_journal_commit_seconds", "time in journal commits",
                                  value=s.commit_seconds)
        yield CounterMetricFamily("actors_journal_commits", "journal commits", value=s.commits)
        yield CounterMetricFamily("actors_dashboard_seconds",
                                  "time the master spent building the dashboard's snapshots",
                                  value=s.dashboard_seconds)
        yield CounterMetricFamily("actors_dashboard_snapshots", "dashboard snapshots built",
                                  value=s.dashboard_builds)


class _Server(Bounded, WSGIServer):
    def server_bind(self) -> None:
        super().server_bind()  # (Bounded's: no name looked up)
        self.setup_environ()  # (what WSGIServer's adds)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def handle(self) -> None:
        # (wsgiref's handler lets a read's timeout through, and the server prints its
        # traceback: one for every connection that says nothing)
        try:
            super().handle()
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # (a scrape every few seconds: not worth a line)


class MetricsServer:
    """The HTTP endpoint; ``publish`` swaps in a new snapshot."""

    def __init__(self, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
        except ImportError:
            raise MissingDependency("prometheus_client", "--metrics", "metrics") from None
        self._collector = _Collector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)  # type: ignore[arg-type]
        # (prometheus_client's own start_http_server: a thread for every connection, held for
        # as long as it sends nothing; ours bounds both, http_bound.py)
        server = _Server6 if ":" in host else _Server
        self._server = make_server(host, port, make_wsgi_app(registry), server_class=server,
                                   handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()
        self.port = self._server.server_port
        self.url = f"http://{host}:{self.port}/metrics"

    def publish(self, snapshot: Snapshot) -> None:
        self._collector.snapshot = snapshot

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
