"""The communication benchmarks run in their CPU small modes and write their result files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--max-mib", "2", "--dim", "512", "--reps", "2"]


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("codec_throughput", [sys.executable, "-m", "benchmarks.codec_throughput", *SMALL]),
        ("dispatch", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                      "-m", "benchmarks.dispatch", *SMALL, "--profile", "1"]),
    ],
)  # fmt: skip
def test_benchmark_small_mode(name: str, command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "DSV3_RESULTS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob(f"{name}-*.md")
    text = result.read_text()
    assert "- device:" in text and "- command:" in text and "fp8" in text
    if name == "dispatch":  # --profile: the host ops of the profiled calls
        assert "profile: 5 float32 dispatch + combine calls at 1 MiB" in text and "| host op |" in text
