"""The plan: its memory model against what the code allocates and saves, its 671B figures against the
ZeRO paper's formulas, the planner's command, the layout search and the recommendations."""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import OVERRIDES, SEQ
from memory_checks import allocation_run

from lightning_dsv3.config import ParallelConfig, count_parameters, get_preset
from lightning_dsv3.model import Transformer
from lightning_dsv3.pipeline.overlap import Chain, Streams, Tape, forward_parts
from lightning_dsv3.pipeline.schedules import make_schedule
from lightning_dsv3.pipeline.simulate import Costs, simulate
from lightning_dsv3.pipeline.stages import ChunkSpec
from lightning_dsv3.plan import (
    GIB,
    GPUS,
    Kernels,
    chunk_activation_bytes,
    chunk_params,
    memory_plan,
    peak_live_bytes,
    recommend,
    search_layouts,
    stage_plan,
)
from lightning_dsv3.plan.__main__ import main
from lightning_dsv3.plan.measure import expert_imbalance, saved_storages

ROOT = Path(__file__).resolve().parents[1]


def _module_counts(config: Any, spec: ChunkSpec, ep: int) -> tuple[int, int]:
    """(dense, routed-expert / ep) parameters of the chunk `spec` as the model builds it."""
    with torch.device("meta"):
        chunk = Transformer(config, spec.layer_ids, spec.with_embedding, spec.with_head)
    dense = sum(p.numel() for n, p in chunk.named_parameters() if ".experts.w" not in n)
    experts = sum(p.numel() for n, p in chunk.named_parameters() if ".experts.w" in n)
    return dense, experts // ep


@pytest.mark.parametrize("preset", ["debug", "mini", "lite"])
def test_chunk_parameters_are_the_modules(preset: str) -> None:
    config = get_preset(preset)
    n = config.n_layers
    specs = [
        ChunkSpec(0, tuple(range(n)), True, True),
        ChunkSpec(0, tuple(range(n // 2)), True, False),
        ChunkSpec(1, tuple(range(n // 2, n)), False, True),
    ]
    for spec in specs:
        for ep in (1, 2, 4):
            p = chunk_params(config, spec, ep)
            assert (p.dense, p.experts) == _module_counts(config, spec, ep)


@pytest.mark.parametrize(
    "layout",
    [{"dp": 2}, {"ep": 2}, {"dp": 2, "zero": False}, {"pp": 2, "schedule": "dualpipe"},
     {"pp": 2, "schedule": "dualpipev"}],
    ids=["dp2", "ep2", "dp2-nozero", "pp2-dualpipe", "pp2-dualpipev"],
)  # fmt: skip
def test_two_ranks_allocate_what_the_plan_says(pool2, layout: dict[str, Any]) -> None:
    _check_allocations(pool2.run(allocation_run, layout), layout, 2)


@pytest.mark.parametrize(
    "layout", [{"pp": 2, "ep": 2, "schedule": "zb1p"}, {"dp": 2, "ep": 2, "zero": False}]
)
def test_four_ranks_allocate_what_the_plan_says(pool4, layout: dict[str, Any]) -> None:
    _check_allocations(pool4.run(allocation_run, layout), layout, 4)


def _check_allocations(results: list[dict[str, Any]], layout: dict[str, Any], world: int) -> None:
    """Parameters, gradients, fp32 masters, their gradients and AdamW moments per rank (fp32 on CPU)."""
    config = get_preset("debug", **OVERRIDES)
    plan = memory_plan(config, ParallelConfig(**layout).resolve(world), 8, SEQ, "32-true", device="cpu")
    for r in results:
        rank = plan.ranks[r["pp_rank"]]
        expected = {
            "params": rank.params_bytes, "grads": rank.grads_bytes, "masters": rank.master_bytes,
            "master_grads": rank.master_grads_bytes, "moments": rank.moments_bytes,
        }  # fmt: skip
        padding = 4 * 4 * world  # ZeRO-1 pads each of its buckets (4 here) to the group size
        for name, value in expected.items():
            assert abs(r[name] - value) <= padding, (name, r[name], value)


def _tape_bytes(config: Any, spec: ChunkSpec, part_wise: bool = True) -> tuple[int, dict[int, float]]:
    """What one pipelined micro-batch keeps: autograd's saved tensors and the tape's cut tensors
    (recorded part by part, as under an FB, or whole, as every other forward)."""
    batch = 4
    chunk = Transformer(config, spec.layer_ids, spec.with_embedding, spec.with_head)
    chunk.init_weights(0)
    tokens = torch.randint(0, 256, (batch, SEQ + 1), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(
        batch, SEQ, config.dim, generator=torch.Generator().manual_seed(1), requires_grad=True
    )
    tape = Tape()
    with saved_storages(chunk) as saved:
        steps = forward_parts(
            chunk, tape, hidden, tokens, False, spec.with_head, lambda c, h, t: c.loss(h, t), 1.0,
            Streams(torch.device("cpu")), Chain(), whole=not part_wise,
        )  # fmt: skip
        for _ in steps:
            pass
    for part in tape.parts:
        for t in [*part.inputs, *part.outputs]:
            saved.keep(t)
    return saved.nbytes, expert_imbalance(chunk)


@pytest.mark.parametrize("option", ["none", "selective", "layer"])
@pytest.mark.parametrize("with_head", [False, True], ids=["middle-stage", "last-stage"])
def test_a_pipelined_micro_batch_keeps_what_the_plan_says(option: str, with_head: bool) -> None:
    """Under the pipeline runtime each layer's parts are cut apart and the tape keeps the cut tensors."""
    config = get_preset("debug", max_seq_len=SEQ, original_seq_len=SEQ, activation_checkpointing=option)
    spec = ChunkSpec(1, (2, 3), False, with_head)
    measured, imbalance = _tape_bytes(config, spec)
    kernels = Kernels.for_device("cpu", "32-true", config)
    items = chunk_activation_bytes(
        config, spec, 4, SEQ, "32-true", kernels, expert_imbalance=imbalance, pipelined=True
    )
    assert sum(items.values()) == measured


@pytest.mark.parametrize("with_head", [False, True], ids=["middle-stage", "last-stage"])
def test_a_whole_recorded_micro_batch_keeps_no_cut_tensors(with_head: bool) -> None:
    """A forward no FB interleaves is one graph: what autograd saves and the stage output, nothing cut."""
    config = get_preset("debug", max_seq_len=SEQ, original_seq_len=SEQ)
    spec = ChunkSpec(1, (2, 3), False, with_head)
    measured, imbalance = _tape_bytes(config, spec, part_wise=False)
    kernels = Kernels.for_device("cpu", "32-true", config)
    items = chunk_activation_bytes(
        config, spec, 4, SEQ, "32-true", kernels, expert_imbalance=imbalance, pipelined=True, part_wise=False
    )
    assert not any(name.startswith("tape:") for name in items)
    assert sum(items.values()) == measured
    assert measured < _tape_bytes(config, spec)[0]  # the part-wise tape keeps more


def test_the_plan_counts_part_wise_tapes_only_where_an_fb_hides_an_exchange() -> None:
    """DualPipe records its FB halves part by part only under ep > 1 (the runtime's rule): at ep = 1
    no tensor cut between a layer's parts is kept."""
    config = get_preset("debug", **OVERRIDES)
    tape = {}
    for ep in (1, 2):
        parallel = ParallelConfig(pp=2, ep=ep, schedule="dualpipe", n_microbatches=4).resolve(2 * ep)
        plan = memory_plan(config, parallel, 2, SEQ, "32-true", device="cpu")
        items = plan.ranks[0].activation_items
        tape[ep] = sum(v for k, v in items.items() if k.startswith("tape:"))
    assert tape[1] == 0 < tape[2]


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "interleaved_1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_the_schedule_replay_agrees_with_the_simulator(name: str) -> None:
    """Micro-batch chunks alive at the peak: the simulator's count where no W is deferred; where one
    is, the replay keeps its activations until the W (the split backward retains the graph)."""
    schedule = make_schedule(name, 4, 8)
    sim = simulate(schedule, Costs(1.0, 2.0, 1.0))
    for rank in range(schedule.pp):
        peak, count = peak_live_bytes(schedule, rank, [1.0] * schedule.n_chunks)
        assert peak == count
        if name in ("zb1p", "dualpipe", "dualpipev"):
            assert count >= sim.peak_activations[rank]
        else:
            assert count == sim.peak_activations[rank]


def test_671b_memory_follows_the_zero_papers_formulas() -> None:
    """ZeRO stage 1 (Rajbhandari et al.): 2 psi + 2 psi + K psi / N bytes with K = 12 (fp32 master,
    momentum and variance). Here psi is a rank's parameters (two stages under DualPipe); the dense
    ones shard over N = dp x ep, the routed experts over N = dp; and the fp32 master gradients that
    ZeRO-1 reduce-scatters into add 4 psi / N."""
    config = get_preset("v3-671b")
    parallel = ParallelConfig(pp=16, dp=2, ep=64, schedule="dualpipe", n_microbatches=30)
    plan = memory_plan(config, parallel, 1, 4096, "bf16-true", "selective")
    stages = stage_plan(config, parallel)
    seen: dict[int, tuple[int, int]] = {}
    for rank in plan.ranks:
        dense = experts = 0
        for spec in stages.chunks_of(rank.pp_rank):
            d, e = _module_counts(config, spec, parallel.ep)
            dense, experts = dense + d, experts + e
            seen[spec.stage] = (d, e)
        psi = dense + experts
        shard = math.ceil(dense / (parallel.dp * parallel.ep)) + math.ceil(experts / parallel.dp)
        assert rank.params_bytes == 2 * psi
        assert rank.grads_bytes == 2 * psi
        assert rank.master_bytes + rank.moments_bytes == 12 * shard
        assert rank.master_grads_bytes == 4 * shard
    counts = count_parameters(config)
    total = sum(d + e * parallel.ep for d, e in seen.values())
    assert total == counts["total"] + counts["mtp"] + config.vocab_size * config.dim  # MTP's own embedding


def _run_main(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


def test_the_671b_plan_fits_with_deepseeks_techniques_and_says_what_this_code_needs() -> None:
    text = _run_main(
        "--preset v3-671b --gpus 2048 --gpu h800 --pp 16 --ep 64 --schedule dualpipe --precision fp8".split()
    )
    assert "pp=16 x dp=2 x ep=64, dualpipe, ZeRO-1 on, fp8" in text
    fits = next(line for line in text.splitlines() if line.strip().startswith("fits in 80GB"))
    assert fits.split()[-2:] == ["NO", "yes"]  # this code as it is; DeepSeek-V3's techniques
    assert "vs 180K published" in text and "GPU-hours per trillion tokens" in text
    assert "Assumptions" in text and "60% of peak on GEMMs" in text


def test_the_search_ranks_layouts_that_fit() -> None:
    config = get_preset("mini")
    found = search_layouts(config, 16, GPUS["h100"], "bf16-true", 256, 2048)
    assert found
    speeds = [c.time.tokens_per_s_per_gpu for c in found]
    assert speeds == sorted(speeds, reverse=True)
    assert all(c.peak_bytes <= GPUS["h100"].memory_bytes for c in found)
    assert all(c.parallel.pp * c.parallel.dp * c.parallel.ep == 16 for c in found)
    args = (
        "--preset mini --gpus 16 --gpu h100 --search --precision bf16-true --global-batch 256 --seq-len 2048"
    )
    text = _run_main([*args.split(), "--top", "3"])
    assert text.count("\n") >= 5 and "tok/s/GPU" in text


def test_recommendations_name_the_change_and_its_effect() -> None:
    config = get_preset("mini")
    parallel = ParallelConfig(pp=4, dp=1, ep=2, schedule="1f1b", n_microbatches=4)
    measured = {"seq_len": 2048, "micro_batch_size": 1, "a2a_fraction": 0.4}
    advice = recommend(config, parallel, measured)
    assert any("n_microbatches=" in a and "bubble" in a for a in advice)
    assert any("zb1p" in a for a in advice)
    assert any("all-to-all takes 40%" in a for a in advice)
    budget = 0.8 * memory_plan(config, parallel, 1, 2048, "bf16-mixed").worst.peak_bytes
    memory = recommend(config, parallel, measured, memory_budget_bytes=budget)
    (fix,) = [a for a in memory if a.startswith("memory")]
    option = fix.split("activation_checkpointing='")[1].split("'")[0]
    assert memory_plan(config, parallel, 1, 2048, "bf16-mixed", option).worst.peak_bytes <= budget
    assert recommend(get_preset("debug"), ParallelConfig()) == []  # a single process has nothing to fix
    assert isinstance(recommend(config, parallel, {"peak_mib": 10 * GIB / 2**20}, 9 * GIB)[0], str)


def test_the_memory_benchmark_runs_its_cpu_mode(tmp_path: Path) -> None:
    env = {**os.environ, "DSV3_RESULTS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.memory_model", "--cpu", "--only", "1", "--steps", "1"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob("memory_model-*.md")
    text = result.read_text()
    assert "- device:" in text and "- torch:" in text and "- command:" in text
    row = next(line for line in text.splitlines() if line.startswith("| fp32 layer"))
    assert row.count("+0.0%") == 2  # saved activations and parameters + optimizer, exactly
