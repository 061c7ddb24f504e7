"""The table a person reads and the JSON a machine keeps, from the measured rows."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from actors.launch import write_atomically
from bench.peers import OURS
from bench.stats import NOT_RUN, Result

LEGEND = ("ours × = how many times better pydra-actors' median is than this row's "
          "(> 1: pydra-actors is better; throughputs divided one way, times the other)")
PAIRED_LEGEND = ("ours × = the median over the interleaved rounds of how many times better "
                 "pydra-actors' value is than this row's in the same round (> 1: pydra-actors "
                 "is better; throughputs divided one way, times the other)")


def advantage(ours: Result, peer: Result, *, paired: bool = False) -> float:
    """How many times better our median is than the peer's (> 1: ours is better). ``paired``
    (an interleaved run: both rows' values in round order): the median of each round's own
    ratio, where both have a value for every round and none is 0."""
    if paired and len(ours.values) == len(peer.values) and all(ours.values) \
            and all(peer.values):
        pairs = zip(ours.values, peer.values, strict=True)
        return statistics.median(o / p if ours.higher_is_better else p / o for o, p in pairs)
    if not ours.values or not peer.values or ours.median == 0 or peer.median == 0:
        return math.nan
    return ours.median / peer.median if ours.higher_is_better else peer.median / ours.median


def _group_key(row: Result) -> tuple[str, str, int]:
    return row.workload, row.metric, row.workers


def ratios(rows: list[Result], *, paired: bool = False) -> list[dict[str, Any]]:
    """Our row against every peer row measured the same way (workload, metric, worker count)."""
    ours = {_group_key(r): r for r in rows if r.runtime == OURS and r.values}
    out = []
    for row in rows:
        mine = ours.get(_group_key(row))
        if row.runtime == OURS or mine is None or not row.values:
            continue
        out.append({
            "workload": row.workload, "metric": row.metric, "workers": row.workers,
            "peer": row.runtime, "variant": row.variant,
            "ours_median": mine.median, "peer_median": row.median,
            "advantage": advantage(mine, row, paired=paired),
        })
    return out


def resolve_targets(rows: list[Result]) -> None:
    """A target that names a runtime ("≥ dask") becomes that runtime's median in the same row
    of this run ("≥ 612.3 (dask)"); it stays as it was (not judged) where that did not run."""
    measured = {(*_group_key(r), r.runtime): r for r in rows if r.values}
    for row in rows:
        op, _, name = row.target.partition(" ")
        peer = measured.get((*_group_key(row), name))
        if peer is not None:
            row.target = f"{op} {peer.median:.1f} ({name})"


def format_number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _target_cell(row: Result) -> str:
    met = row.target_met()
    if met is None:
        return row.target
    return f"{row.target} {'met' if met else 'MISSED'}"


def table(rows: list[Result], *, paired: bool = False) -> str:
    """Rows grouped by workload and metric, pydra-actors first, with medians, ranges and ratios
    (``paired``: per round, see ``advantage``)."""
    ours = {_group_key(r): r for r in rows if r.runtime == OURS and r.values}
    groups: dict[tuple[str, str], list[Result]] = {}
    not_run = [r for r in rows if r.metric == NOT_RUN]
    for row in rows:
        if row.metric != NOT_RUN:
            groups.setdefault((row.workload, row.metric), []).append(row)
    header = (f"  {'runtime':<14}{'variant':<34}{'wkrs':>5}{'n':>9}{'median':>11}{'min':>11}"
              f"{'max':>11}{'ours ×':>9}  target")
    lines = [PAIRED_LEGEND if paired else LEGEND]
    for (workload, metric), members in groups.items():
        better = "higher" if members[0].higher_is_better else "lower"
        lines += ["", f"{workload} — {metric} ({better} is better)", header]
        members.sort(key=lambda r: (r.workers, r.runtime != OURS))
        for row in members:
            lead = f"  {row.runtime:<14}{row.variant[:33]:<34}{row.workers:>5}"
            if not row.values:
                lines.append(f"{lead}   {row.skipped}")
                continue
            mine = ours.get(_group_key(row))
            ratio = "" if row.runtime == OURS or mine is None \
                else f"{advantage(mine, row, paired=paired):.2f}×"
            numbers = "".join(f"{format_number(v):>11}" for v in (row.median, row.low, row.high))
            lines.append(f"{lead}{row.n:>9}{numbers}{ratio:>9}  {_target_cell(row)}")
    if not_run:
        lines += ["", "not run"]
        lines += [f"  {r.runtime:<14}{r.workload:<24}{r.skipped}" for r in not_run]
    return "\n".join(lines)


def targets_summary(rows: Iterable[Result]) -> str:
    judged = [r for r in rows if r.target_met() is not None]
    if not judged:
        return ""
    met = [r for r in judged if r.target_met()]
    missed = [f"{r.workload} {r.metric} ({format_number(r.median)} vs {r.target})"
              for r in judged if not r.target_met()]
    text = f"targets met: {len(met)} of {len(judged)}"
    return text + ("; missed: " + "; ".join(missed) if missed else "")


def document(rows: list[Result], *, paired: bool = False, **header: Any) -> dict[str, Any]:
    """Everything a later reader needs: how it was run, on what, every value, and the ratios
    (``paired``: per round, see ``advantage``)."""
    return {"schema": 1, **header, "results": [r.to_json() for r in rows],
            "ratios": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in ratio.items()} for ratio in ratios(rows, paired=paired)]}


def write_json(doc: dict[str, Any], path: Path) -> None:
    """Whole or not at all; ``--json /dev/null`` writes to the device, never over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(path), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
