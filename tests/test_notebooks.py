"""The tutorial notebooks: committed without outputs, and each runs top to bottom.

The execution test starts a real Jupyter kernel (the ``python3`` kernelspec, whose
``python`` command jupyter_client resolves to the running interpreter) in a
temporary working folder; each notebook creates its own throw-away project there.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_explore_behavior", "02_train_and_compare", "03_next_best_action"}


def test_the_three_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {index} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {index} was executed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_reads_as_a_tutorial(path: Path):
    nb = nbformat.read(path, as_version=4)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 5
    # logic lives in the package: code cells stay short
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert len(cell.source.splitlines()) <= 15, f"{path.name} cell {index} is long"


def _is_plot_cell(cell: nbformat.NotebookNode) -> bool:
    return "show(" in cell.source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("PROPENSITY_CONFIG", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
    plots = [c for c in nb.cells if c.cell_type == "code" and _is_plot_cell(c)]
    assert plots, f"{path.name} has no plot cell"
    for cell in plots:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"plot cell of {path.name} produced no image: {cell.source[:60]!r}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.get("output_type") == "error"]
            assert not errors
