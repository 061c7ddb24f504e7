"""The client's side of the several-hosts tests, run on the client's host:
``python -m tests.multihost.jobs ADDRESS KEYS JOB KWARGS_JSON`` prints one JSON line."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter

from actors import Client, ParallelTask
from actors.errors import ActorsError
from actors.task import Unit


class Hostnames(ParallelTask):
    """Which host ran each unit."""

    def get_work(self, n):
        return range(n)

    def work_unit(self, unit):
        time.sleep(0.002)
        return socket.gethostname()

    def reduce(self, results):
        return dict(Counter(results))


class TreeOfBytes(ParallelTask):
    """Leaves make ``size`` bytes each, inner units add up what they are given: the leaves'
    bytes move to the units that take them (worker to worker), only sizes go further."""

    def get_work(self, leaves, size, fan_in=4):
        level = [Unit(("leaf", i, size)) for i in range(leaves)]
        yield from level
        while len(level) > 1:
            level = [Unit(("add",), after=level[i:i + fan_in])
                     for i in range(0, len(level), fan_in)]
            yield from level

    def work_unit(self, arg, *parts):
        if arg[0] == "leaf":
            return bytes([arg[1] % 251]) * arg[2]
        return sum(len(p) if isinstance(p, bytes) else p for p in parts)

    def reduce(self, results):
        (total,) = results
        return total


class Marked(ParallelTask):
    """Units that leave a mark per run in ``marks`` (a file per unit, a byte per run) and
    return their number."""

    def get_work(self, n, marks, pause):
        for i in range(n):
            yield (i, marks, pause)

    def work_unit(self, arg):
        i, marks, pause = arg
        time.sleep(pause)
        with open(os.path.join(marks, str(i)), "ab") as f:
            f.write(b"x")
        return i

    def reduce(self, results):
        return sum(results)


def main(address: str, keys: str, job: str, kwargs: dict) -> dict:
    task = {"hostnames": Hostnames, "tree": TreeOfBytes, "marked": Marked}[job]
    with Client(address, keys=keys) as client:
        client.wait_for_workers(kwargs.pop("workers", 4), timeout=60)
        started = time.monotonic()
        future = client.submit(task, **kwargs)
        try:
            result = future.result(timeout=float(os.environ.get("JOB_TIMEOUT", 200)))
        except TimeoutError:  # what the test's failure shows: where the task stands
            story = future.story()
            print(f"not done; progress {future.progress()}; the story's last 80 entries:",
                  *map(repr, story[-80:]), sep="\n", file=sys.stderr)
            raise
        except ActorsError as exc:
            return {"error": type(exc).__name__, "message": str(exc),
                    "seconds": round(time.monotonic() - started, 2)}
        seconds = time.monotonic() - started
        story = future.story()
    # (key, fetching worker, holder) per fetch; a worker's id is "node/worker"
    arrivals = [(e[0], e[3].split(": ")[0], e[3].split("data ")[1]) for e in story
                if e[1] == "flight" and e[2] == "memory"]
    crossed = [(key, me.split("/")[0]) for key, me, holder in arrivals
               if me.split("/")[0] != holder.split("/")[0]]
    # A node fetches a key once for all its workers: the distinct (key, node) pairs are what
    # had to cross the wire, the unit's index after the task id's colon.
    indexes = {key: key.rpartition(":")[2] for key, _ in crossed}
    leaves_across = len({(key, node) for key, node in crossed
                         if indexes[key].isdigit() and int(indexes[key]) < kwargs.get("leaves", 0)})
    return {"result": result, "seconds": round(seconds, 2), "fetches": len(arrivals),
            "fetches_across_nodes": len(crossed), "leaves_across_nodes": leaves_across}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
