"""What the master keeps so that people can watch a cluster: bounded records, no I/O.

The Master actor feeds these from its own mailbox (dispatches, results, task output) and, on
its tick, turns them with the scheduler's state into the plain dicts the dashboard serves
(``overview``, ``task_detail``). Nothing here is shared with another thread: the dashboard's
HTTP threads only ever see the JSON bytes the actor encoded (see ``actors/dashboard.py``).

Every record is bounded, whatever a cluster runs:

- ``OutputRings``: the last ``OUTPUT_LINES`` lines of each task, ``OUTPUT_BYTES`` in all (the
  task whose output came least recently goes first); what is not kept is counted.
- ``TaskStream``: the last ``STREAM_EVENTS`` finished runs (a unit batch, or a plain Task) per
  master, and at most ``STREAM_OPEN`` runs waiting for their result.
- ``Throughput``: one sample a second for ``THROUGHPUT_SAMPLES`` seconds.
- ``overview`` lists every unfinished task up to ``LISTED_OPEN`` and the newest finished ones up
  to ``LISTED_FINISHED``; the rest are counted, not listed.
"""

from __future__ import annotations

import pickle
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from actors.core.scheduler_events import TaskKind, TaskStatus
from actors.core.scheduler_state import SchedulerState, StoryEntry, TaskRecord
from actors.messages import OutputLine

OUTPUT_LINES = 1_000  # per task
OUTPUT_BYTES = 32 << 20  # all tasks together
LABEL_CHARS = 200  # of a line's stream, level, logger or phase name (a worker's word)

STREAM_EVENTS = 5_000
STREAM_OPEN = 20_000  # runs dispatched and not answered (a lost worker's never are)
STREAM_WINDOW_S = 60.0  # what the page's task stream shows
STREAM_SENT = 2_000  # bars a snapshot carries at most
THROUGHPUT_SAMPLES = 300
LISTED_OPEN = 500
LISTED_FINISHED = 200
STORY_SHOWN = 500  # a task page's story: its newest entries
OUTPUT_SHOWN = 500  # a task page's output: its newest lines
FINISHED = frozenset({TaskStatus.DONE, TaskStatus.ERRED, TaskStatus.CANCELLED})


def line_size(line: OutputLine) -> int:
    """What a kept line counts against the budget: its every string."""
    return len(line.text) + len(line.stream) + len(line.level) + len(line.logger) + len(line.phase)


def trimmed(line: OutputLine) -> OutputLine:
    """The line with its labels cut to ``LABEL_CHARS`` (a worker's code writes them; a
    megabyte in a logger's name was kept, and forwarded, as if it were no text at all)."""
    if max(len(line.stream), len(line.level), len(line.logger), len(line.phase)) <= LABEL_CHARS:
        return line
    return msgspec.structs.replace(
        line, stream=line.stream[:LABEL_CHARS], level=line.level[:LABEL_CHARS],
        logger=line.logger[:LABEL_CHARS], phase=line.phase[:LABEL_CHARS])


@dataclass
class _Ring:
    lines: deque[tuple[str, OutputLine]] = field(default_factory=deque)
    size: int = 0  # characters of its lines held (line_size)
    dropped: int = 0  # lines not held (dropped by workers, or pushed out here)


class OutputRings:
    """The last lines each task printed or logged, for ``python -m actors logs`` and the page."""

    def __init__(self, lines: int = OUTPUT_LINES, budget: int = OUTPUT_BYTES) -> None:
        self.max_lines, self.budget = lines, budget
        self.rings: OrderedDict[str, _Ring] = OrderedDict()  # least recently written first
        self.size = 0

    def add(self, task_id: str, worker_id: str, lines: list[OutputLine], dropped: int) -> None:
        ring = self.rings.get(task_id)
        if ring is None:
            ring = self.rings[task_id] = _Ring()
        else:
            self.rings.move_to_end(task_id)
        ring.dropped += dropped
        for line in lines:
            ring.lines.append((worker_id, line))
            size = line_size(line)
            ring.size += size
            self.size += size
        while len(ring.lines) > self.max_lines:
            self._pop_oldest(ring)
        while self.size > self.budget and self.rings:
            oldest = next(iter(self.rings.values()))
            while oldest.lines and self.size > self.budget:
                self._pop_oldest(oldest)
            if not oldest.lines and oldest is not ring:
                self.rings.popitem(last=False)  # (its dropped count goes with it)
            elif not oldest.lines:
                break

    def _pop_oldest(self, ring: _Ring) -> None:
        _, line = ring.lines.popleft()
        size = line_size(line)
        ring.size -= size
        self.size -= size
        ring.dropped += 1

    def get(self, task_id: str, limit: int) -> tuple[list[tuple[str, OutputLine]], int]:
        """The newest ``limit`` lines, oldest first, and how many the task printed beyond."""
        ring = self.rings.get(task_id)
        if ring is None:
            return [], 0
        kept = list(ring.lines)
        shown = kept[-limit:] if limit > 0 else []
        return shown, ring.dropped + len(kept) - len(shown)

    def forget_except(self, task_ids: dict[str, Any]) -> None:
        """Drop the rings of tasks the scheduler no longer keeps."""
        for task_id in [t for t in self.rings if t not in task_ids]:
            ring = self.rings.pop(task_id)
            self.size -= ring.size


class TaskStream:
    """When each run (a batch of units, or a plain Task) was on which worker: the master's view,
    from the dispatch to the result. A worker runs one batch at a time, so a batch that waited
    behind another starts where the worker says it worked (``elapsed``) before its result."""

    def __init__(self, events: int = STREAM_EVENTS, open_runs: int = STREAM_OPEN) -> None:
        # (worker, task, run id; 0 for a plain Task) -> (dispatched at, units)
        self.open: OrderedDict[tuple[str, str, int], tuple[float, int]] = OrderedDict()
        self.max_open = open_runs
        # (worker, task id, start, end, units, ok), on the master's monotonic clock
        self.done: deque[tuple[str, str, float, float, int, bool]] = deque(maxlen=events)

    def started(self, worker_id: str, task_id: str, run_id: int, units: int, now: float) -> None:
        self.open[(worker_id, task_id, run_id)] = (now, units)
        if len(self.open) > self.max_open:
            self.open.popitem(last=False)

    def pack(self) -> bytes:
        """What it holds as one pickle, and nothing held: see ``SchedulerState.pack_finished``
        (the last runs of a burst were allocated all through it)."""
        blob = pickle.dumps((list(self.open.items()), list(self.done)),
                            protocol=pickle.HIGHEST_PROTOCOL)
        self.open.clear()
        self.done.clear()
        return blob

    def unpack(self, blob: bytes) -> None:
        open_runs, done = pickle.loads(blob)
        self.open.update(open_runs)
        self.done.extend(done)

    def finished(self, worker_id: str, task_id: str, run_id: int, elapsed: float, ok: bool,
                 now: float) -> None:
        begun = self.open.pop((worker_id, task_id, run_id), None)
        if begun is None:
            return  # dispatched before the master started, or pushed out of the open runs
        start = max(begun[0], now - elapsed) if elapsed > 0 else begun[0]
        self.done.append((worker_id, task_id, start, now, begun[1], ok))


class Throughput:
    """Units finished and tasks ended, sampled once a second: rates over time for the page."""

    def __init__(self, samples: int = THROUGHPUT_SAMPLES) -> None:
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=samples)
        self.tasks_ended = 0

    def pack(self) -> bytes:
        """Its samples as one pickle, and none held (see ``TaskStream.pack``)."""
        blob = pickle.dumps(list(self.samples), protocol=pickle.HIGHEST_PROTOCOL)
        self.samples.clear()
        return blob

    def unpack(self, blob: bytes) -> None:
        self.samples.extend(pickle.loads(blob))

    def sample(self, now: float, units_done: int) -> bool:
        """Take a sample if a second passed since the last; whether it did."""
        if self.samples and now - self.samples[-1][0] < 1.0:
            return False
        self.samples.append((now, units_done, self.tasks_ended))
        return True

    def rates(self, now: float) -> list[tuple[float, float, float]]:
        """(seconds before ``now``, units/s, tasks/s) per interval, oldest first."""
        points = list(self.samples)
        return [(round(b[0] - now, 2), round((b[1] - a[1]) / (b[0] - a[0]), 1),
                 round((b[2] - a[2]) / (b[0] - a[0]), 2))
                for a, b in zip(points, points[1:], strict=False) if b[0] > a[0]]


# --- the page's data, built on the master's tick ----------------------------------------


def _times(task: TaskRecord) -> tuple[float, float, float]:
    """A task's submitted, started and ended times (monotonic; 0: not known) from its story,
    looking only at its first and last entries: a big task's story holds thousands of units
    (``task.lines``, read in place: ``task.story`` would copy them)."""
    story: Sequence[StoryEntry] = task.lines
    submitted, started, ended = task.queued_at, 0.0, 0.0
    for index, (key, _, finish, _, when) in enumerate(story):
        if index > 50 or (submitted and started):
            break
        if key == "task" and finish == "queued" and not submitted:
            submitted = when
        elif key == "task" and finish == "running" and not started:
            started = when
    for index, (key, _, finish, _, when) in enumerate(reversed(story)):
        if index > 50:
            break
        if key == "task" and finish in ("done", "erred", "cancelled"):
            ended = when
            break
    return submitted, started, ended


def task_row(task: TaskRecord, progress: tuple[int, int], now: float, wall: float) -> dict[str, Any]:
    submitted, started, ended = _times(task)
    done, total = progress
    return {"id": task.task_id, "name": task.name, "client": task.client_id,
            "status": str(task.state), "kind": str(task.kind), "priority": task.priority,
            "done": done, "total": total, "workers": len(task.workers),
            "submitted": round(submitted + wall, 3) if submitted else 0,
            "started": round(started + wall, 3) if started else 0,
            "ended": round(ended + wall, 3) if ended else 0}


def overview(sched: SchedulerState, *, progress: Any, hosts: dict[str, str],
             stream: TaskStream, throughput: Throughput, counters: dict[str, Any],
             master: dict[str, Any], now: float, wall: float,
             usage: dict[str, tuple[float, int]] | None = None, held: int = 0) -> dict[str, Any]:
    """The dashboard's main page. ``progress(task) -> (done, total)``; ``hosts``: node -> host;
    ``wall``: add to a monotonic time to get seconds since the epoch; ``usage``: worker ->
    (CPU %, resident bytes), as its node last said; ``held``: tasks the master holds back
    from the scheduler (master_backlog.py), counted as queued."""
    usage = usage or {}
    statuses: Counter[str] = Counter()
    if held:
        statuses[TaskStatus.QUEUED] += held
    open_tasks: list[TaskRecord] = []
    finished: deque[TaskRecord] = deque(maxlen=LISTED_FINISHED)
    for record in sched.tasks.values():  # in submission order
        statuses[record.state] += 1
        if record.state in FINISHED:
            finished.append(record)
        elif len(open_tasks) < LISTED_OPEN:
            open_tasks.append(record)
    open_tasks.sort(key=lambda t: (t.state is not TaskStatus.RUNNING, -t.priority, t.seq))
    listed = open_tasks + list(reversed(finished))
    rows = [task_row(t, progress(t), now, wall) for t in listed]
    nodes = []
    for node_id, worker_ids in sorted(sched.nodes.items()):
        workers = []
        for worker_id in sorted(worker_ids):
            worker = sched.workers.get(worker_id)
            if worker is None:
                continue
            task = sched.tasks.get(worker.task_id) if worker.task_id else None
            workers.append({"id": worker_id, "state": "busy" if task else "idle",
                            "task": task.task_id if task else "",
                            "task_name": task.name if task else "",
                            "driver": bool(task and task.driver == worker_id),
                            "in_flight": len(worker.in_flight), "queued": len(worker.queued),
                            # the package version its process imported (warm for), if any
                            "package": (f"{worker.warm_for.package} {worker.warm_for.version}"
                                        if worker.warm_for and worker.warm_for.package else ""),
                            "cpu": usage.get(worker_id, (None, None))[0],
                            "rss": usage.get(worker_id, (None, None))[1]})
        nodes.append({"id": node_id, "host": hosts.get(node_id, ""), "workers": workers})
    since = now - STREAM_WINDOW_S
    bars = [(w, t, round(s - now, 3), round(e - now, 3), n, ok)
            for w, t, s, e, n, ok in stream.done if e >= since][-STREAM_SENT:]
    # What runs now: a bar up to the present, one per worker (its oldest run: a worker runs one
    # at a time, the others wait behind it), from when the one before it ended.
    ended = {w: e for w, _, _, e, _, _ in stream.done}
    running: dict[str, tuple[str, str, float, float, int, bool]] = {}
    for (w, t, _), (s, n) in stream.open.items():
        task = sched.tasks.get(t)
        if w not in running and w in sched.workers and task is not None and not task.finished:
            running[w] = (w, t, round(max(s, ended.get(w, s)) - now, 3), 0.0, n, True)
    bars += running.values()
    return {
        "master": master, "now": round(now + wall, 3),
        "counts": {"tasks": dict(statuses), "listed": len(listed),
                   "workers": len(sched.workers),
                   "busy": sum(1 for w in sched.workers.values() if w.task_id is not None),
                   "nodes": len(sched.nodes),
                   "queued_units": sum(len(t.units.pending) for t in open_tasks
                                       if t.kind is TaskKind.PARALLEL),
                   **counters},
        "nodes": nodes, "tasks": rows, "throughput": throughput.rates(now),
        "stream": {"window": STREAM_WINDOW_S, "bars": bars},
    }


def task_detail(sched: SchedulerState, task_id: str, *, progress: Any, rings: OutputRings,
                now: float, wall: float) -> dict[str, Any]:
    """One task's page: its row, the scheduler's story (newest ``STORY_SHOWN`` entries, with
    where each open unit is now) and its last ``OUTPUT_SHOWN`` lines of output."""
    task = sched.tasks.get(task_id)
    if task is None:
        return {"id": task_id, "error": f"no task {task_id} on this master (or forgotten since)"}
    story = sched.story(task_id, now)[-STORY_SHOWN:]
    lines, dropped = rings.get(task_id, OUTPUT_SHOWN)
    return {"id": task_id, "task": task_row(task, progress(task), now, wall),
            "story": [(k, a, b, c, round(t + wall, 3)) for k, a, b, c, t in story],
            "output": [(w, ln.stream, ln.unit, ln.text, ln.time) for w, ln in lines],
            "dropped": dropped}
