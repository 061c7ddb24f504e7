"""The invariants of the worker state machine, checked from outside it.

``validate(ws)`` raises AssertionError, naming the key, if any invariant of ``WorkerState`` (see
the theory of operation in worker_state.py) does not hold. ``WorkerState.validate()`` calls it;
the tests call that after every ``handle``, and the Worker actor does too when
``ACTORS_VALIDATE_STATE=1``. It reads the state's internals (its indices) but changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.core.worker_events import HOLDING, Role, UnitState, Work

if TYPE_CHECKING:  # the checks read the state's internals; the state imports them when asked
    from actors.core.worker_state import Unit, WorkerState

RELEASED, WAITING, READY = UnitState.RELEASED, UnitState.WAITING, UnitState.READY
EXECUTING, MEMORY, ERROR = UnitState.EXECUTING, UnitState.MEMORY, UnitState.ERROR
FETCH, FLIGHT, MISSING = UnitState.FETCH, UnitState.FLIGHT, UnitState.MISSING
CANCELLED, RESUMED = UnitState.CANCELLED, UnitState.RESUMED
RESCHEDULED, FORGOTTEN = UnitState.RESCHEDULED, UnitState.FORGOTTEN


def validate(ws: WorkerState) -> None:
    """Raise AssertionError, naming the key, if any invariant does not hold."""
    ready, fetch, executing, transfers = ws._indices()
    _check(ws._ready == ready, f"ready queue {ws._ready} != ready keys {ready}")
    _check(ws._fetch_queue == fetch, f"fetch queue {ws._fetch_queue} != fetch keys {fetch}")
    _check(ws._executing == executing, f"executing {ws._executing} != {executing}")
    _check(ws._transfers == transfers, f"transfers {ws._transfers} != {transfers}")
    _check(len(executing) <= ws.nthreads, f"{len(executing)} executions > {ws.nthreads}")
    _check(len(transfers) <= ws.max_fetches, f"{len(transfers)} transfers > {ws.max_fetches}")
    in_memory = {key for key, u in ws.units.items() if u.state is MEMORY}
    _check(set(ws.data) == in_memory, f"data for {set(ws.data)} but memory {in_memory}")
    for key, unit in ws.units.items():
        validate_unit(ws, key, unit)


def validate_unit(ws: WorkerState, key: str, u: Unit) -> None:
    """The invariants of one key: its state, its bookkeeping, its links to its neighbours."""
    where = f"{key!r} ({u.state}, {u.role})"
    _check(u.key == key and u.state is not FORGOTTEN, f"{where}: misfiled")
    working = u.state in (EXECUTING, FLIGHT, CANCELLED, RESUMED)
    _check(working == (u.running is not None), f"{where}: running={u.running}")
    _check(u.state is not EXECUTING or u.running is Work.EXECUTION, f"{where}: not executing")
    _check(u.state is not FLIGHT or u.running is Work.TRANSFER, f"{where}: not in flight")
    _check((u.running is Work.TRANSFER) == (u.peer is not None), f"{where}: peer={u.peer}")
    if u.state in (WAITING, READY, EXECUTING):
        _check(u.role is Role.COMPUTE and u.spec is not None, f"{where}: computed without spec")
    if u.state in (FETCH, FLIGHT, MISSING):
        _check(u.role is Role.HOLD, f"{where}: fetched but assigned")
    if u.state is FETCH:
        _check(bool(u.who_has), f"{where}: queued for fetch with no holder")
    if u.state is MISSING:
        _check(not u.who_has, f"{where}: missing but holders {u.who_has} are known")
    if u.state is WAITING:
        _check(not ws._inputs_in_memory(u), f"{where}: waiting with every input in memory")
    if u.state is READY:
        _check(ws._inputs_in_memory(u), f"{where}: ready with inputs not in memory")
    if u.state is ERROR:
        _check(u.error is not None, f"{where}: error without an error")
    if u.role is Role.HOLD and (u.state in HOLDING):
        _check(ws._needed(u), f"{where}: held but no dependent needs it")
    if u.role is Role.HOLD and u.state is RELEASED:
        _check(bool(u.dependents), f"{where}: hold-only, released and unused: not forgotten")
    if u.state is RESCHEDULED:
        _check(u.role is Role.COMPUTE, f"{where}: a dependency cannot be stolen")
    for dep in u.dependencies:
        _check(dep in ws.units and key in ws.units[dep].dependents,
               f"{where}: dependency {dep!r} does not list it as a dependent")
    for dependent in u.dependents:
        _check(dependent in ws.units and key in ws.units[dependent].dependencies,
               f"{where}: dependent {dependent!r} does not depend on it")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


__all__ = ["validate", "validate_unit"]
