"""CUDA graphs of pipeline chunks, one capture per micro-batch in flight: how many slots a schedule
needs, the runtime's slot bookkeeping (checked on CPU with a stand-in for the capture that runs the
layers as they are), what makes a chunk ineligible, and on a GPU the graphed step against the plain one."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.accelerators import CPUAccelerator

from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.config import get_preset
from lightning_dsv3.model.transformer import LossOutput, Transformer
from lightning_dsv3.pipeline.graphs import (
    ChunkGraphs,
    experts_off_grouped_gemm,
    graphs_ineligible,
    slots_needed,
)
from lightning_dsv3.pipeline.runtime import PipelineRuntime
from lightning_dsv3.pipeline.schedules import Action, Op, make_schedule
from lightning_dsv3.pipeline.stages import StagePlan

CONFIG = get_preset("debug", max_seq_len=16, original_seq_len=16)


def _loss(chunk: Transformer, h: torch.Tensor, tokens: torch.Tensor) -> LossOutput:
    return chunk.loss(h, tokens)


def _with_static_buffers(
    modules: tuple[torch.nn.Module, ...], samples: tuple, allow_unused_input: bool
) -> tuple:
    """Stands in for `torch.cuda.make_graphed_callables` on CPU, aliasing as it does: a warm-up forward
    per layer (which moves the router's expert load, as the real warm-up does), then each layer returns
    one static output buffer, hands back its gradients in static buffers, and keeps only the autograd
    graph of its last forward. Two micro-batches in one slot at once, or a static gradient adopted as
    `.grad`, therefore give wrong results here as they would on a GPU."""
    for module, args in zip(modules, samples):
        module(*args)
    return tuple(_static(module) for module in modules)


def _static(module: torch.nn.Module) -> torch.nn.Module:
    params, run = tuple(module.parameters()), module.forward
    store: dict[str, Any] = {}

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *weights: torch.Tensor
        ) -> torch.Tensor:
            with torch.enable_grad():
                store["x"] = x.detach().requires_grad_(True)
                store["y"] = run(store["x"], cos, sin)
            out = store.setdefault("out", torch.empty_like(store["y"]))
            return out.copy_(store["y"].detach()).detach()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            grads = torch.autograd.grad(store["y"], (store["x"], *params), grad, allow_unused=True)
            bufs = store.setdefault("grads", [torch.empty_like(t) for t in (store["x"], *params)])
            for buf, g in zip(bufs, grads):
                buf.zero_() if g is None else buf.copy_(g)
            return (bufs[0].detach(), None, None, *(b.detach() for b in bufs[1:]))

    module.forward = lambda x, cos, sin: Replay.apply(x, cos, sin, *params)
    return module


class _Loopback(PipelineRuntime):
    """One pipeline rank alone: receives are seeded random tensors, sends are kept for inspection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[torch.Tensor] = []

    def _communicate(self, actions: tuple[Action, ...], state: Any, microbatches: list[torch.Tensor]) -> None:
        for a in actions:
            key = (a.mb, a.chunk)
            if a.op is Op.SEND_ACT:
                self.sent.append(state.sends.pop(key).detach().clone())
            elif a.op is Op.SEND_GRAD:
                self.sent.append(state.input_grads.pop(key).clone())
            else:
                gen = torch.Generator().manual_seed(1000 * a.mb + 10 * a.chunk + (a.op is Op.RECV_GRAD))
                buf = self._hidden_buffer(microbatches[a.mb])
                buf.copy_(torch.randn(buf.shape, generator=gen))
                (state.acts if a.op is Op.RECV_ACT else state.grads)[key] = buf


@pytest.fixture
def cpu_experts_graphable(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the routed experts take the fallback that reads counts on the host, which a real capture
    could not hold; with the capture stood in for, the runtime may graph them anyway."""
    monkeypatch.setattr("lightning_dsv3.pipeline.graphs.experts_off_grouped_gemm", lambda chunk: None)


def _runtime(name: str, rank: int, graphed: bool, n_microbatches: int = 8) -> _Loopback:
    schedule = make_schedule(name, 2, n_microbatches)
    plan = StagePlan.build(CONFIG, schedule)
    chunks = []
    for spec in plan.chunks_of(rank):
        chunk = Transformer(CONFIG, spec.layer_ids, spec.with_embedding, spec.with_head)
        chunk.init_weights(0)
        chunk.parts_compiled = True  # as compiled chunks: B runs the backward whole
        chunks.append(chunk)
    runtime = _Loopback(schedule, chunks, rank, None, lambda r: r, _loss)
    if graphed:
        slots = slots_needed(schedule.actions[rank], len(chunks))
        runtime.graphs = [ChunkGraphs(c, n, make_graphed=_with_static_buffers) for c, n in zip(chunks, slots)]
    return runtime


def _step(runtime: _Loopback, seed: int = 0) -> tuple[list[float], list[torch.Tensor]]:
    n = runtime.schedule.n_microbatches
    tokens = torch.randint(0, CONFIG.vocab_size, (2 * n, 9), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(next(runtime.chunks[0].parameters()).device)
    losses = runtime.run(list(tokens.chunk(n)), 1.0 / n)
    grads = [p.grad.clone() for c in runtime.chunks for p in c.parameters() if p.grad is not None]
    return [float(out.loss.detach()) for _, out in sorted(losses, key=lambda x: x[0])], grads


def test_slots_follow_the_micro_batches_a_schedule_keeps_in_flight() -> None:
    """1F1B at pp=2: rank 0 holds two micro-batches between forward and backward, rank 1 one; a
    DualPipe rank holds more on its chunks, and never fewer than one."""
    one_f_one_b = make_schedule("1f1b", 2, 8)
    assert slots_needed(one_f_one_b.actions[0], 1) == [2]
    assert slots_needed(one_f_one_b.actions[1], 1) == [1]
    dualpipe = make_schedule("dualpipe", 2, 8)
    for rank in range(2):
        slots = slots_needed(dualpipe.actions[rank], dualpipe.n_chunks)
        assert all(s >= 1 for s in slots) and max(slots) >= 2


@pytest.mark.parametrize(("name", "rank"), [("1f1b", 0), ("1f1b", 1), ("dualpipe", 0), ("dualpipev", 1)])
@pytest.mark.usefixtures("cpu_experts_graphable")
def test_a_graphed_step_matches_the_plain_one_and_gives_every_slot_back(name: str, rank: int) -> None:
    """Through the slots (the capture stood in for), the same losses, gradients and sends bit for
    bit; every slot free at the end of a step; one capture for two steps; the warm-up's change to the
    router's expert load undone."""
    plain, graphed = _runtime(name, rank, graphed=False), _runtime(name, rank, graphed=True)
    for seed in range(2):
        expected, got = _step(plain, seed), _step(graphed, seed)
        assert got[0] == expected[0]
        assert len(got[1]) == len(expected[1])
        for a, b in zip(got[1], expected[1]):
            assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(graphed.sent, plain.sent))
    for graphs in graphed.graphs:
        assert graphs is not None and sorted(graphs._free) == list(range(graphs.slots))
        assert graphs.captures == 1
    loads = [
        (p.expert_load, q.expert_load)
        for cp, cg in zip(plain.chunks, graphed.chunks)
        for p, q in zip(cp.modules(), cg.modules())
        if hasattr(p, "expert_load")
    ]
    assert loads and all(torch.equal(a, b) for a, b in loads)


@pytest.mark.usefixtures("cpu_experts_graphable")
def test_the_layers_are_captured_as_the_step_starts_before_any_send_or_receive() -> None:
    """A capture never runs beside the step's NCCL work, nor holds up a peer in the middle of the step."""
    runtime = _runtime("dualpipe", 1, graphed=True)
    captures_at_each_exchange = []
    exchange = runtime._communicate

    def communicate(*args: Any) -> None:
        captures_at_each_exchange.append([g.captures for g in runtime.graphs if g is not None])
        exchange(*args)

    runtime._communicate = communicate  # type: ignore[method-assign]
    _step(runtime)
    assert captures_at_each_exchange and all(c == [1, 1] for c in captures_at_each_exchange)


@pytest.mark.usefixtures("cpu_experts_graphable")
def test_two_micro_batches_in_one_slot_would_corrupt_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the slots are for, and proof that the stand-in above can tell: 1F1B's first rank keeps two
    micro-batches in flight; forced into one slot, the first backward runs through the second
    micro-batch's graph (the only one the slot keeps) and the second finds it spent."""
    monkeypatch.setattr(ChunkGraphs, "acquire", lambda self: 0)
    monkeypatch.setattr(ChunkGraphs, "release", lambda self, slot: None)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _step(_runtime("1f1b", 0, graphed=True))


@pytest.mark.usefixtures("cpu_experts_graphable")
def test_what_a_graph_bakes_in_captures_again_when_it_changes() -> None:
    """The aux-loss scale is a number read at capture, the weights' addresses and gradient flags are
    baked into the graphs; each change captures again, with a warning."""
    runtime = _runtime("1f1b", 0, graphed=True)
    _step(runtime)
    (graphs,) = runtime.graphs
    assert graphs is not None and graphs.captures == 1
    changes = [
        lambda: runtime.chunks[0].set_aux_loss_scale(0.5),
        lambda: setattr(
            next(runtime.chunks[0].parameters()), "data", next(runtime.chunks[0].parameters()).data.clone()
        ),
        lambda: next(runtime.chunks[0].parameters()).requires_grad_(False),
    ]
    for n, change in enumerate(changes, start=2):
        change()
        with pytest.warns(UserWarning, match=f"CUDA graphs again \\(capture {n}\\)"):
            _step(runtime)
        assert graphs.captures == n
    _step(runtime)
    assert graphs.captures == len(changes) + 1


@pytest.mark.usefixtures("cpu_experts_graphable")
def test_dropping_the_graphs_frees_them_at_once_and_the_next_step_captures_again() -> None:
    """The strategy's teardown drops them: their pools would otherwise stay allocated for as long as a
    reference cycle keeps the runtime, past the end of fitting."""
    runtime = _runtime("1f1b", 0, graphed=True)
    plain, _ = _step(_runtime("1f1b", 0, graphed=False))
    _step(runtime)
    (graphs,) = runtime.graphs
    assert graphs is not None
    captured = weakref.ref(graphs._layers[0][0])
    runtime.drop_graphs()
    assert captured() is None  # freed by the drop itself, not by some later collection
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: no "capturing again" warning
        losses, _ = _step(runtime)
    assert graphs.captures == 2
    torch.testing.assert_close(losses, plain)


@pytest.mark.usefixtures("cpu_experts_graphable")
def test_the_strategy_teardown_frees_the_captures() -> None:
    runtime = _runtime("1f1b", 0, graphed=True)
    _step(runtime)
    (graphs,) = runtime.graphs
    assert graphs is not None and graphs._layers
    strategy = DSV3Strategy(accelerator=CPUAccelerator())
    strategy.cluster_environment = LightningEnvironment()
    strategy.runtime = runtime
    strategy.teardown()
    assert not graphs._layers


@pytest.mark.usefixtures("cpu_experts_graphable")
def test_a_step_that_raised_leaves_no_slot_taken() -> None:
    runtime = _runtime("1f1b", 0, graphed=True)
    (graphs,) = runtime.graphs
    assert graphs is not None
    graphs.acquire()
    graphs.acquire()
    _step(runtime)  # would find every slot taken
    assert sorted(graphs._free) == list(range(graphs.slots))


def test_every_parameter_has_a_gradient_before_the_first_backward() -> None:
    """Autograd would otherwise adopt a graph's static gradient buffer as `.grad`, and the next
    micro-batch's replay would overwrite it."""
    runtime = _runtime("1f1b", 1, graphed=True)
    (graphs,) = runtime.graphs
    assert graphs is not None
    graphs.prepare_step()
    assert all(p.grad is not None and not p.grad.any() for p in runtime.chunks[0].parameters())


def test_running_out_of_slots_says_so() -> None:
    chunk = Transformer(CONFIG, [0], True, False)
    graphs = ChunkGraphs(chunk, 1, make_graphed=_with_static_buffers)
    graphs.acquire()
    with pytest.raises(RuntimeError, match="all 1 CUDA graph slots"):
        graphs.acquire()
    with pytest.raises(ValueError, match="at least one slot"):
        ChunkGraphs(chunk, 0)


def test_a_capture_that_fails_names_the_layers_and_what_to_do() -> None:
    def refuse(modules: tuple, samples: tuple, allow_unused_input: bool) -> tuple:
        raise RuntimeError("operation not permitted when stream is capturing")

    chunk = Transformer(CONFIG, [0], True, False)
    graphs = ChunkGraphs(chunk, 1, make_graphed=refuse)
    graphs.prepare_step()
    with pytest.raises(RuntimeError, match=r"layers \[0\] failed.*compile=True") as caught:
        graphs.run_layers(0, torch.randn(2, 8, CONFIG.dim))
    assert "not permitted" in str(caught.value.__cause__)


def test_a_recapture_that_failed_part_way_captures_every_slot_at_the_next_call() -> None:
    calls = 0

    def second_slot_fails_once(modules: tuple, samples: tuple, allow_unused_input: bool) -> tuple:
        nonlocal calls
        calls += 1
        if calls == 4:  # the first capture takes calls 1 and 2; the recapture fails at its second slot
            raise RuntimeError("operation failed due to a previous error during capture")
        return _with_static_buffers(modules, samples, allow_unused_input)

    chunk = Transformer(CONFIG, [0], True, False)
    graphs = ChunkGraphs(chunk, 2, make_graphed=second_slot_fails_once)
    h = torch.randn(2, 8, CONFIG.dim)
    graphs.prepare_step()
    graphs.run_layers(1, h)
    chunk.set_aux_loss_scale(0.5)
    graphs.prepare_step()
    with pytest.warns(UserWarning, match="again"), pytest.raises(RuntimeError, match="failed"):
        graphs.run_layers(0, h)
    with pytest.warns(UserWarning, match="again"):
        graphs.run_layers(1, h)  # both slots captured again, none taken as done
    assert len(graphs._layers) == 2


def test_what_keeps_a_chunk_off_cuda_graphs() -> None:
    cuda = torch.device("cuda")  # only its type is read
    dense = Transformer(CONFIG, [0], True, False)
    assert "CUDA device" in graphs_ineligible(dense, False, torch.device("cpu"))
    assert "compiled" in graphs_ineligible(dense, False, cuda)
    dense.parts_compiled = True
    assert graphs_ineligible(dense, False, cuda) is None
    assert "all-to-all" in graphs_ineligible(dense, True, cuda)
    assert experts_off_grouped_gemm(dense) is None
    moe = Transformer(CONFIG, [0, 1], True, False)  # layer 1 is MoE, its experts fp32 on the CPU
    assert "grouped GEMM" in experts_off_grouped_gemm(moe)
    checkpointed = Transformer(CONFIG.replace(activation_checkpointing="mlp"), [0, 1], True, False)
    checkpointed.parts_compiled = True
    assert "checkpointing" in graphs_ineligible(checkpointed, False, cuda)


def test_experts_that_would_sync_turn_graphs_off_at_the_first_step() -> None:
    """fp32 experts on the CPU take the host-synchronising fallback: the step warns and runs plain."""
    runtime = _runtime("1f1b", 0, graphed=True)
    with pytest.warns(UserWarning, match="chunk 0 runs without CUDA graphs: the routed experts"):
        _step(runtime)
    assert runtime.graphs == [None]


def test_a_chunk_that_asks_for_graphs_where_none_can_run_warns_and_runs_plain() -> None:
    schedule = make_schedule("1f1b", 2, 2)
    chunk = Transformer(CONFIG, [0, 1], True, False)
    chunk.cuda_graphs = True
    with pytest.warns(UserWarning, match="runs without CUDA graphs: CUDA graphs need a CUDA device"):
        runtime = _Loopback(schedule, [chunk], 0, None, lambda r: r, _loss)
    assert runtime.graphs == [None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("name", "rank"), [("1f1b", 0), ("dualpipe", 1)])
def test_captured_graphs_give_the_plain_step_on_a_gpu(name: str, rank: int) -> None:
    """Real captures of compiled bf16 layers (the grouped GEMM: no host sync in the MoE): losses,
    gradients and sends of two steps as the same chunks without graphs."""
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        schedule = make_schedule(name, 2, 4)
        chunks = []
        for spec in StagePlan.build(CONFIG, schedule).chunks_of(rank):
            chunk = Transformer(CONFIG, spec.layer_ids, spec.with_embedding, spec.with_head)
            chunk.init_weights(0)
            chunk.to("cuda", torch.bfloat16)
            chunk.compile_parts("reduce-overhead" if graphed else None, pipelined=True)
            chunks.append(chunk)
        runtime = _Loopback(schedule, chunks, rank, None, lambda r: r, _loss)
        steps = [_step(runtime, seed) for seed in range(2)]
        # still graphed after the steps (the first step may drop a chunk's graphs, with a warning)
        assert all(g is not None and g.captures == 1 for g in runtime.graphs) is graphed
        results.append((steps, [t.cpu() for t in runtime.sent]))
    (plain, plain_sent), (graphed_steps, graphed_sent) = results
    bf16 = {"rtol": 2e-2, "atol": 2e-2}  # the MoE backward's atomic adds are not bitwise reproducible
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, graphed_steps):
        torch.testing.assert_close(loss_b, loss_a, **bf16)
        assert len(grads_a) == len(grads_b)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b.float(), a.float(), **bf16)
    assert len(plain_sent) == len(graphed_sent)
    for a, b in zip(plain_sent, graphed_sent):
        torch.testing.assert_close(b.float(), a.float(), **bf16)
