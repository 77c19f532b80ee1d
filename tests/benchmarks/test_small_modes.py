"""Every benchmark script runs in its CPU small mode and writes its result file.

Multi-process scripts run under torchrun with two gloo ranks, as their GPU runs do with NCCL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMALL_MODES = {
    "end_to_end": [
        "--preset",
        "debug",
        "--steps",
        "5",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--profile",
        "1",
        "--bias-update-speed",
        "0.02",
    ],
    "norm_kernels": ["--tokens", "512", "--dim", "64", "--reps", "2"],
    "checkpointing": [
        "--preset",
        "debug",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--options",
        "none",
        "layer",
    ],
    "overlap": ["--preset", "debug", "--layers", "2", "--tokens", "64", "--seq-len", "32", "--reps", "1"],
    "gc_pause": ["--preset", "debug", "--young", "100", "--repeats", "1"],
    "grouped_gemm": [
        "--preset",
        "debug",
        "--tokens",
        "256",
        "--ways",
        "eager",
        "--reps",
        "2",
        "--warmup",
        "1",
    ],
    "part_calls": [
        "--preset",
        "debug",
        "--seq-len",
        "32",
        "--micro-batch",
        "2",
        "--layers",
        "0-2",
        "--steps",
        "2",
        "--warmup",
        "1",
    ],  # fmt: skip
}


SMALL_MODES_VARIANTS = "plain,auto,dsv3,dsv3-padv,dsv3-compile".split(",")  # end_to_end's default

TORCHRUN_SMALL_MODES = {
    "pipeline_schedules": [
        "--preset", "debug", "--seq-len", "32", "--micro-batch", "1", "--n-microbatches", "4", "--steps", "2",
        "--warmup", "1",
    ],
    "zero": ["--preset", "debug", "--seq-len", "32", "--batch", "2", "--steps", "3", "--warmup", "1"],
    "pipeline_host": ["--layers", "2", "--steps", "2", "--warmup", "1"],
    "exposed_exchange": [
        "--preset", "debug", "--seq-len", "32", "--micro-batch", "1", "--n-microbatches", "4", "--steps", "2",
        "--warmup", "1",
    ],
}  # fmt: skip


def _run(args: list[str], script: str, cwd: Path, results: Path, **env: str) -> str:
    """Run a benchmark's command with its results going to `results`; the one result file's text."""
    env = {**os.environ, "DSV3_RESULTS_DIR": str(results), "PYTHONPATH": str(ROOT), **env}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = list(results.glob(f"{script}*.md"))
    assert len(files) == 1
    return files[0].read_text()


def _tables(text: str) -> list[list[list[str]]]:
    """The rows of each markdown table of the result file (header left out), cells stripped."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            rows = None
        elif rows is None:  # a header
            rows = []
            tables.append(rows)
        elif not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


def _table(text: str) -> list[list[str]]:
    """The rows of the result file's first markdown table."""
    return _tables(text)[0]


@pytest.mark.parametrize("script", sorted(SMALL_MODES))
def test_benchmark_small_mode(script: str, tmp_path: Path) -> None:
    text = _run([sys.executable, "-m", f"benchmarks.{script}", *SMALL_MODES[script]], script, ROOT, tmp_path)
    assert "- device:" in text and "- command:" in text and "| " in text
    if script == "end_to_end":  # the profiled steps' tables, one per variant
        assert text.count("profiled steps 1..3") == len(SMALL_MODES_VARIANTS)
        # how unevenly the routers spread tokens at the timed steps: a largest expert at least at the mean
        assert all(float(r[5]) >= 1.0 for r in _table(text))
        assert "bias_update_speed 0.02," in text  # the gamma asked for, not the debug preset's 0.01
    elif script == "norm_kernels":  # both residual dtypes, eager and compiled (aten's op: GPUs only)
        rows = _table(text)
        assert [(r[0], r[1]) for r in rows] == [
            ("float32", "eager"), ("float32", "compiled"), ("bfloat16", "eager"), ("bfloat16", "compiled")
        ]  # fmt: skip
        assert float(rows[2][3]) < float(rows[0][3])  # a bf16 residual moves fewer bytes
    elif script == "checkpointing":
        saved = {r[0]: float(r[-1].rstrip("%")) for r in _table(text)}
        assert saved["none"] == 0.0 and saved["layer"] > 30  # recomputing whole layers keeps far less
    elif script == "gc_pause":  # frozen, the long-lived objects leave the full collection's walk
        rows = {r[0]: r for r in _table(text)}
        assert int(rows["as Python sees it"][1].replace(",", "")) > 10_000
        assert rows["after gc.freeze()"][1] == "0"
    elif script == "grouped_gemm":  # forward and backward timed, one row per way; then each GEMM kind
        rows = _table(text)
        assert [r[:2] for r in rows] == [["eager", "uniform"], ["eager", "model"]]
        assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)
        for kinds in _tables(text)[-2:]:  # uniform routing, then the preset's routers'
            assert len(kinds) == 12 and all(float(r[2]) > 0 for r in kinds)
            (pieces,) = [r for r in kinds if "balanced" in r[1] and r[0] == "64 -> 32"]
            assert float(pieces[4].split()[2]) < 1e-5  # the pieces' sum equals the whole weight gradient
    elif script == "part_calls":  # the chunk whole, by parts on two streams and by parts on one
        rows = _table(text)
        assert [r[0].split()[0] for r in rows] == ["whole", "parts", "parts,"]
        assert all(float(r[1]) > 0 and int(r[-1]) > 0 for r in rows)


def test_schedules_benchmark_refuses_torch_split_backward_compiled() -> None:
    args = [sys.executable, "-m", "benchmarks.pipeline_schedules", "--compile", "--torch", "1f1b,zbv"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "zbv cannot run compiled stages" in out.stderr


def test_schedules_benchmark_runs_torch_eager_beside_our_compiled_stages(tmp_path: Path) -> None:
    """--torch-eager: torch's DualPipeV, which cannot run compiled stages, runs eager on the same cut and
    micro-batches as our compiled DualPipeV, named so, with the same first loss."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    small = TORCHRUN_SMALL_MODES["pipeline_schedules"]
    args = [*launch, "-m", "benchmarks.pipeline_schedules", *small, "--compile", "--torch-eager"]
    text = _run(
        [*args, "--ours", "dualpipev", "--torch", "dualpipev"], "pipeline_schedules", tmp_path, tmp_path
    )
    assert "torch's stages eager" in text
    rows = _table(text)
    assert [r[:2] for r in rows[1:]] == [
        ["lightning_dsv3", "dualpipev"], ["torch.distributed.pipelining (eager)", "dualpipev"]
    ]  # fmt: skip
    assert max(float(r[-1]) for r in rows) - min(float(r[-1]) for r in rows) < 1e-4


@pytest.mark.parametrize("script", sorted(TORCHRUN_SMALL_MODES))
def test_multi_process_benchmark_small_mode(script: str, tmp_path: Path) -> None:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*launch, "-m", f"benchmarks.{script}", *TORCHRUN_SMALL_MODES[script]]
    text = _run(args, script, tmp_path, tmp_path, OMP_NUM_THREADS="1")
    assert "- command: `torchrun --nproc_per_node 2 -m benchmarks." in text
    rows = _table(text)
    if script == "pipeline_schedules":
        ours = [r for r in rows if r[0] == "lightning_dsv3"]
        assert [r[1] for r in ours] == ["1f1b", "zb1p", "dualpipe", "dualpipev"]
        measured = [r for r in rows if r[2] != "—"]
        assert len(measured) >= 5  # ours, and torch's wherever this torch has the schedule
        first_losses = {float(r[-1]) for r in measured}
        assert max(first_losses) - min(first_losses) < 1e-4  # the same model and batch in every schedule
        predicted = {r[1]: r for r in _tables(text)[1] if r[0] == "lightning_dsv3"}
        assert list(predicted) == ["1f1b", "zb1p", "dualpipe", "dualpipev"]
        for row in predicted.values():  # peak and retries per rank (no allocator on CPU), then the
            # bubble and each feeding's "step ms (error)" and bubble
            assert row[4] == "0.0 / 0.0" and row[5] == "0 / 0"
            assert all("%)" in cell for cell in row[7::2]) and all(cell.endswith("%") for cell in row[8::2])
    elif script == "zero":
        assert [r[0] for r in rows] == ["dsv3", "dsv3-zero1", "ddp", "ddp-zero"]
        optimizer = {r[0]: float(r[3].replace(",", "")) for r in rows}
        assert optimizer["ddp-zero"] < optimizer["ddp"]
        # fp32 parameters are their own ZeRO-1 master: half the moments at dp=2, no copy of the weights
        assert optimizer["dsv3-zero1"] == pytest.approx(optimizer["dsv3"] / 2, rel=0.1)
    elif script == "exposed_exchange":  # the one-rank V and the plain step, each against its stand-in
        assert [r[0].split()[0] for r in rows] == ["dualpipev", "1f1b"]
        assert all(float(r[4]) > 0 and r[5].endswith("%") for r in rows)  # an exchange was on the wire
        assert abs(float(rows[0][-1]) - float(rows[1][-1])) < 1e-4  # the same model and micro-batches
    else:  # pipeline_host: dp=2 and DualPipe over 8 micro-batches, whose parts dispatch more ops
        ops = {r[0]: int(r[6]) for r in rows}
        assert list(ops) == ["dsv3:dp=2", "dsv3:pp=2,schedule=dualpipe,n_microbatches=8"]
        assert ops["dsv3:pp=2,schedule=dualpipe,n_microbatches=8"] > ops["dsv3:dp=2"] > 0


def test_end_to_end_multi_small_mode_against_a_one_process_curve(tmp_path: Path) -> None:
    """The docstring's CPU small mode: a one-process baseline, then every layout over two gloo ranks
    against its loss curve. In fp32 the curves agree to reduction order, on the same global batches."""
    small = ["--preset", "debug", "--seq-len", "32", "--global-batch", "8", "--steps", "3", "--warmup", "1"]
    script, baseline = "end_to_end_multi", tmp_path / "one.json"
    one, two = tmp_path / "one", tmp_path / "two"
    args = [sys.executable, "-m", f"benchmarks.{script}", *small, "--variants", "dsv3"]
    _run([*args, "--dump-losses", str(baseline)], script, tmp_path, one, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*launch, "-m", f"benchmarks.{script}", *small, "--curve-from", str(baseline)]
    text = _run(args, script, tmp_path, two, OMP_NUM_THREADS="1")
    assert "- command: `torchrun --nproc_per_node 2 -m benchmarks." in text
    speed, curves = _tables(text)
    assert [r[0] for r in speed][:3] == ["ddp", "dsv3:dp=2", "dsv3:ep=2"] and len(speed) == 5
    for row in speed:
        assert float(row[7]) < 1e-5 and float(row[8]) < 1e-5 and row[9] == "yes", row
    assert [r[0] for r in curves] == ["1", "3"] and len(curves[0]) == 1 + 1 + len(speed)
