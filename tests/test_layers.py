"""The layers point one way: the message catalogue and errors at the bottom, the sans-I/O cores
above them, the actor shells and the transport above those, the command lines on top; no cycle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "transport")
# What a core may import besides the standard library's pure modules.
CORE_MAY_IMPORT = ("actors.core", "actors.errors", "actors.messages")
IO_AND_THREADS = {"zmq", "pykka", "threading", "structlog", "time", "socket", "subprocess",
                  "multiprocessing", "asyncio", "sqlite3", "os", "selectors"}
# One process each: started with ``python -m``, never imported by another module of the runtime.
PROCESS_ENTRY_POINTS = {"actors.master", "actors.node", "actors.worker", "actors.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If)
                  and ast.unparse(n.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")]:
        guard.body = []  # imports for type hints only: not a dependency at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    """The runtime's own modules and which of them each imports."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    names = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in names and m != name}
            for name, path in names.items()}


def test_the_cores_import_nothing_above_them_and_no_io() -> None:
    deps = graph()
    cores = [name for name in deps if name.startswith("actors.core.")]
    assert "actors.core.scheduler_state" in cores and "actors.core.worker_state" in cores
    problems = []
    for name in cores:
        path = ROOT / (name.replace(".", "/") + ".py")
        for module in imports_of(path):
            if module.split(".")[0] in IO_AND_THREADS:
                problems.append(f"{name} imports {module}")
            elif module.split(".")[0] in PACKAGES and not module.startswith(CORE_MAY_IMPORT):
                problems.append(f"{name} imports {module}, above the cores")
    assert problems == []


def test_no_module_imports_a_process_entry_point() -> None:
    """``python -m actors.master`` must run master.py once: nothing may import it back."""
    deps = graph()
    importers = {(name, target) for name, targets in deps.items() for target in targets
                 if target in PROCESS_ENTRY_POINTS}
    # `python -m actors` runs the tools; a node forks its first workers, which run worker.main
    # in the child instead of starting an interpreter (prefork.py); a LocalCluster forks its
    # master and node from its caller, which run master.main and node.main (local_start.py).
    assert importers == {("actors.__main__", "actors.cli"), ("actors.prefork", "actors.worker"),
                         *(("actors.local_start", f"actors.{entry}")
                           for entry in ("master", "node", "worker"))}


def test_the_transport_knows_nothing_of_tasks() -> None:
    deps = graph()
    above = {(name, t) for name, targets in deps.items() if name.startswith("transport")
             for t in targets if t.startswith("actors") and t != "actors.errors"}
    assert above == set()


def test_the_modules_import_each_other_without_a_cycle() -> None:
    deps = graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(deps[name]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target] if target in path else [target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(deps):
        if name not in state:
            visit(name, [name])
    # A package's __init__ re-exporting its modules is not a cycle of substance.
    cycles = [c for c in cycles if not any(m in PACKAGES for m in c)]
    assert cycles == []


def test_the_layer_checks_see_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    fake = ROOT / "actors" / "core" / "_layer_probe.py"
    fake.write_text("def later():\n    import time\n    from zmq import Context\nfrom . import sibling\n")
    try:
        assert {"time", "zmq", "actors.core.sibling"} <= imports_of(fake)
    finally:
        fake.unlink()


def test_the_public_names_resolve_and_a_process_does_not_import_the_client() -> None:
    """``actors`` exports its names on first use: each one in ``__all__`` resolves to what its
    module defines, and a master, node or worker process (a fresh interpreter importing only
    its entry module) does not import the client's modules."""
    import subprocess
    import sys

    import actors

    assert set(actors.__all__) == {*actors._PUBLIC, "__version__"}
    for name in actors._PUBLIC:
        assert getattr(actors, name) is getattr(importlib.import_module(actors._PUBLIC[name]), name)
    for entry in ("actors.master", "actors.node", "actors.worker"):
        loaded = subprocess.run(
            [sys.executable, "-c", f"import sys, {entry}; print(sorted(sys.modules))"],
            capture_output=True, text=True, timeout=60, check=True).stdout
        assert "'actors.client'" not in loaded and "'actors.async_client'" not in loaded, entry
