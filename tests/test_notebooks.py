"""The example notebooks run headless, top to bottom, as a user would run them (nbclient): a
cell that raises fails the test. They are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.processes

NOTEBOOKS = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
CELL_TIMEOUT_S = 120  # the notebooks take seconds; the bound only keeps a hang from stalling


def test_the_notebooks_are_there_and_committed_without_outputs() -> None:
    books = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert len(books) >= 4, books
    for path in books:
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), path


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_a_notebook_runs_without_a_cell_error(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    # Nor a warning a user would wonder about (TqdmWarning without ipywidgets, in every book
    # with a progress bar).
    warned = [o.text for c in book.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr" and "Warning" in o.text]
    assert not warned, warned
