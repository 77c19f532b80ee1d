"""The masterclass notebook runs top to bottom on CPU, and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "masterclass.ipynb"
CELL_TIMEOUT_S = 300  # the training cell takes seconds on an idle laptop; shared CI machines are slower
# Set in this process by earlier tests that ran a strategy in it; inherited by the kernel, MASTER_PORT
# would point the notebook's run at a port this process still listens on, and LOCAL_RANK would make
# Lightning believe its processes were already launched.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_notebook_runs_without_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs (its asserts check the formulas, bounds and the falling loss), in this interpreter."""
    for name in LAUNCH_ENV:  # the notebook starts its own processes; nothing may look pre-launched
        monkeypatch.delenv(name, raising=False)
    kernels = tmp_path / "jupyter"
    install_kernelspec(kernel_name="dsv3-test", prefix=str(kernels))  # argv: this sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(kernels / "share" / "jupyter"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="dsv3-test", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # Gantt charts, bubble curves, balance, loss, measured timeline
