"""Every benchmark script runs in its CPU small mode and writes its result file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMALL_MODES = {
    "end_to_end": ["--preset", "debug", "--steps", "3", "--seq-len", "32", "--batch", "2", "--warmup", "1"],
    "overlap": ["--preset", "debug", "--layers", "2", "--tokens", "64", "--seq-len", "32", "--reps", "1"],
}


@pytest.mark.parametrize("script", sorted(SMALL_MODES))
def test_benchmark_small_mode(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "DSV3_RESULTS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *SMALL_MODES[script]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    files = list(tmp_path.glob(f"{script}*.md"))
    assert len(files) == 1
    text = files[0].read_text()
    assert "- device:" in text and "- command:" in text and "| " in text
