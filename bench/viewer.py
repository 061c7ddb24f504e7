"""``python -m bench.viewer --creator PID``: keep the dashboard open on the bench's clusters.

Does what the dashboard page does, without a browser: polls ``/api/state`` once a second on the
dashboard of every ``LocalCluster`` that process ``PID`` starts (found by their ready files, in
the folders ``actors-cluster-<PID>-*`` under the temporary directory), so that the master builds
its snapshot all the time. Run it beside ``python -m bench`` to measure what a watched master
costs; it exits when ``PID`` does and prints how many polls were answered.

    python -m bench --quick --only many,tiny & python -m bench.viewer --creator $!
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

POLL_S = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.viewer")
    parser.add_argument("--creator", type=int, required=True,
                        help="the pid of the process whose LocalClusters to watch")
    args = parser.parse_args(argv)
    pattern = os.path.join(tempfile.gettempdir(), f"actors-cluster-{args.creator}-*", "ready.json")
    due: dict[str, float] = {}  # the state URL of each dashboard seen -> next poll
    answered = failed = 0
    while _alive(args.creator):
        for ready in glob.glob(pattern):
            try:
                with open(ready) as f:
                    url = json.load(f).get("dashboard", "")
            except (OSError, ValueError):
                continue  # being written, or gone
            if url:
                due.setdefault(url.replace("/?token=", "/api/state?token="), 0.0)
        now = time.monotonic()
        for url, when in list(due.items()):
            if when > now:
                continue
            due[url] = now + POLL_S
            try:
                with urllib.request.urlopen(url, timeout=10) as answer:
                    answer.read()
                answered += 1
            except (urllib.error.URLError, OSError):
                failed += 1  # its cluster was closed meanwhile
                del due[url]
        time.sleep(0.1)
    sys.stdout.write(f"dashboards watched: {len(due)} open at the end; polls answered "
                     f"{answered}, failed {failed}\n")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
