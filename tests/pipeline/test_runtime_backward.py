"""The runtime's backward: a B followed at once by its own W runs as one full backward, with the
same gradients bit for bit; a B whose input gradient is sent before its W stays split."""

from __future__ import annotations

from typing import Any

import torch

from lightning_dsv3.config import get_preset
from lightning_dsv3.model.moe import MoE
from lightning_dsv3.model.transformer import LossOutput, Transformer
from lightning_dsv3.pipeline.overlap import Chain, Streams, Tape, forward_parts
from lightning_dsv3.pipeline.runtime import PipelineRuntime, part_wise_forwards
from lightning_dsv3.pipeline.schedules import Action, Op, make_schedule
from lightning_dsv3.pipeline.stages import StagePlan

CONFIG = get_preset("debug", max_seq_len=16, original_seq_len=16)


def _loss(chunk: Transformer, h: torch.Tensor, tokens: torch.Tensor) -> LossOutput:
    return chunk.loss(h, tokens)


class _Loopback(PipelineRuntime):
    """One pipeline rank alone: receives are random tensors, sends are dropped."""

    def _communicate(self, actions: tuple[Action, ...], state: Any, microbatches: list[torch.Tensor]) -> None:
        for a in actions:
            key = (a.mb, a.chunk)
            if a.op is Op.SEND_ACT:
                state.sends.pop(key)
            elif a.op is Op.SEND_GRAD:
                state.input_grads.pop(key)
            else:
                buf = torch.randn_like(self._hidden_buffer(microbatches[a.mb]))
                (state.acts if a.op is Op.RECV_ACT else state.grads)[key] = buf


def _run_rank(name: str, pp: int, n_microbatches: int, rank: int) -> list[str]:
    torch.manual_seed(0)
    schedule = make_schedule(name, pp, n_microbatches)
    plan = StagePlan.build(CONFIG, schedule)
    chunks = []
    for spec in plan.chunks_of(rank):
        chunk = Transformer(CONFIG, spec.layer_ids, spec.with_embedding, spec.with_head)
        chunk.init_weights(0)
        chunks.append(chunk)
    runtime = _Loopback(schedule, chunks, rank, None, lambda r: r, _loss)
    tokens = torch.randint(0, CONFIG.vocab_size, (2 * n_microbatches, 9))
    runtime.run(list(tokens.chunk(n_microbatches)), 1.0 / n_microbatches)
    return [t.action for t in runtime.timings]


def test_a_b_right_before_its_w_runs_as_one_backward() -> None:
    # DualPipe, pp=2: each rank ends with B then W of its stage-0 chunk, nothing in between
    listed = [str(a) for a in make_schedule("dualpipe", 2, 4).compute_actions(0)]
    assert listed[-2:] == ["B(1.0)", "W(1.0)"]
    ran = _run_rank("dualpipe", 2, 4, rank=0)
    assert ran == listed[:-2] + ["BW(1.0)"]


def test_a_b_whose_gradient_is_sent_first_stays_split() -> None:
    # DualPipeV, pp=2, rank 0: B(0.1) SEND_GRAD W(0.1) keeps the split; its stage-0 B, W pairs fuse
    ran = _run_rank("dualpipev", 2, 4, rank=0)
    assert "B(0.1)" in ran and "W(0.1)" in ran
    assert not any(a.startswith("B(") and a.endswith(".0)") for a in ran)
    assert any(a.startswith("BW(") and a.endswith(".0)") for a in ran)


def _grads_after(split: bool, whole: bool = False) -> dict[str, torch.Tensor]:
    chunk = Transformer(CONFIG, [1, 2], with_embedding=False, with_head=False)
    chunk.init_weights(0)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 8, CONFIG.dim, generator=gen).requires_grad_(True)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=gen)
    tape, streams = Tape(), Streams(torch.device("cpu"))
    for _ in forward_parts(
        chunk, tape, hidden, tokens, False, False, _loss, 1.0, streams, Chain(), whole=whole
    ):
        pass
    assert len(tape.parts) == (1 if whole else 8)  # two layers of four parts, or the chunk as one
    grad_out = torch.randn(tape.output.shape, generator=gen)
    for _ in tape.backward_parts(grad_out, split, streams, Chain()):
        pass
    if split:
        tape.backward_weights()
    grads = {n: p.grad for n, p in chunk.named_parameters() if p.grad is not None}
    grads["input"] = tape.input_grad
    return grads


def test_split_backward_equals_full_backward_bit_for_bit() -> None:
    split, full = _grads_after(split=True), _grads_after(split=False)
    assert split.keys() == full.keys() and len(split) > 10
    for name in split:
        assert torch.equal(split[name], full[name]), name


def test_a_whole_recorded_chunk_splits_and_matches_the_part_wise_one() -> None:
    whole_split, whole_full = _grads_after(split=True, whole=True), _grads_after(split=False, whole=True)
    parts = _grads_after(split=False)
    assert whole_split.keys() == whole_full.keys() == parts.keys()
    for name in parts:
        assert torch.equal(whole_split[name], whole_full[name]), name
        # the same ops; only where one tensor feeds two parts are its gradients summed in another order
        torch.testing.assert_close(whole_full[name], parts[name], rtol=1e-6, atol=1e-7, msg=name)


def test_what_is_recorded_part_by_part() -> None:
    """Where a chunk exchanges tokens, both halves of every FB; in an eager chunk a micro-batch whose W
    runs apart from its B (a whole chunk's W would walk every layer's input gradients, and the
    all-to-alls, again); nothing else."""
    assert not part_wise_forwards(make_schedule("1f1b", 2, 4).actions[0], [False], [True])
    zb1p = make_schedule("zb1p", 2, 4).actions[1]  # stage 1 sends its input gradient before W
    apart = {(a.mb, a.chunk) for i, a in enumerate(zb1p) if a.op is Op.W and zb1p[i - 1].op is not Op.B}
    assert apart and part_wise_forwards(zb1p, [False], [True]) == apart
    assert not part_wise_forwards(zb1p, [True], [True])  # compiled: B runs whole, W walks nothing
    assert part_wise_forwards(zb1p, [False], [False]) == apart  # a W apart costs as much without one
    actions = make_schedule("dualpipe", 2, 8).actions[0]
    parts = part_wise_forwards(actions, [True, True], [True, True])
    fbs = [a for a in actions if a.op is Op.FB]
    assert fbs and all((a.mb, a.chunk) in parts and (a.mb2, a.chunk2) in parts for a in fbs)
    forwards = {(a.mb, a.chunk) for a in actions if a.op is Op.F}
    assert forwards - parts  # the warm-up's forwards are recorded whole
    assert not part_wise_forwards(actions, [True, True], [False, False])  # nothing to overlap
    one = part_wise_forwards(actions, [True, True], [True, False])  # only chunk 0 exchanges
    assert one and {c for _, c in one} == {0}


def test_a_compiled_chunk_runs_its_split_backward_whole() -> None:
    """A compiled part is one backward node for input and weight gradients: B runs it whole (every weight
    gradient is there after B, W has nothing left) and the gradients are the eager ones."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 8, CONFIG.dim, generator=gen)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=gen)
    grad_out = torch.randn(2, 8, CONFIG.dim, generator=gen)
    grads = []
    for compiled in (False, True):
        chunk = Transformer(CONFIG, [1, 2], with_embedding=False, with_head=False)
        chunk.init_weights(0)
        if compiled:
            chunk.compile_parts()
        tape, streams = Tape(), Streams(torch.device("cpu"))
        parts = forward_parts(
            chunk, tape, hidden.requires_grad_(True), tokens, False, False, _loss, 1.0, streams, Chain()
        )
        for _ in parts:
            pass
        for _ in tape.backward_parts(grad_out, True, streams, Chain()):
            pass
        after_b = {n: p.grad for n, p in chunk.named_parameters() if p.grad is not None}
        assert all(part.weight_work is None for part in tape.parts) is compiled
        if compiled:
            assert len(after_b) == sum(1 for _ in chunk.parameters())
        tape.backward_weights()
        grads.append({n: p.grad for n, p in chunk.named_parameters()})
    eager, compiled_grads = grads
    for name, grad in eager.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class _ElsewhereDispatcher:
    """Stands in for an all-to-all dispatcher (identity): only its type says the experts are elsewhere."""

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor, token_ids: Any = None) -> tuple[Any, ...]:
        return tokens, counts, None

    def combine(self, expert_out: torch.Tensor, ctx: Any) -> torch.Tensor:
        return expert_out


def test_a_loss_part_whose_mtp_layers_exchange_runs_its_backward_whole_at_b() -> None:
    """A W walks its part's graph again: over the loss part it would repeat the MTP layers' all-to-alls."""
    weight_work = []
    for elsewhere in (False, True):
        chunk = Transformer(CONFIG, [3], with_embedding=False, with_head=True)
        chunk.init_weights(0)
        if elsewhere:
            for module in chunk.mtp.modules():
                if isinstance(module, MoE):
                    module.dispatcher = _ElsewhereDispatcher()
        gen = torch.Generator().manual_seed(3)
        hidden = torch.randn(2, 8, CONFIG.dim, generator=gen).requires_grad_(True)
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=gen)
        tape, streams = Tape(), Streams(torch.device("cpu"))
        for _ in forward_parts(chunk, tape, hidden, tokens, False, True, _loss, 1.0, streams, Chain()):
            pass
        for _ in tape.backward_parts(None, True, streams, Chain()):
            pass
        weight_work.append(tape.parts[-1].weight_work is not None)
    assert CONFIG.mtp_depth > 0 and weight_work == [True, False]


def _recorded_parts(monkeypatch: Any, elsewhere: bool) -> list[int]:
    """Run DualPipe's rank 0 (pp=2, 4 micro-batches): how many parts each micro-batch's tape had."""
    import lightning_dsv3.pipeline.runtime as runtime_module

    sizes: list[int] = []

    def counting(chunk: Transformer, tape: Tape, *args: Any, **kwargs: Any) -> Any:
        yield from forward_parts(chunk, tape, *args, **kwargs)
        sizes.append(len(tape.parts))

    monkeypatch.setattr(runtime_module, "forward_parts", counting)
    schedule = make_schedule("dualpipe", 2, 4)
    plan = StagePlan.build(CONFIG, schedule)
    chunks = []
    for spec in plan.chunks_of(0):
        chunk = Transformer(CONFIG, spec.layer_ids, spec.with_embedding, spec.with_head)
        chunk.init_weights(0)
        if elsewhere:
            for module in chunk.modules():
                if isinstance(module, MoE):
                    module.dispatcher = _ElsewhereDispatcher()
        chunks.append(chunk)
    runtime = _Loopback(schedule, chunks, 0, None, lambda r: r, _loss)
    torch.manual_seed(0)
    tokens = torch.randint(0, CONFIG.vocab_size, (8, 9))
    runtime.run(list(tokens.chunk(4)), 0.25)
    return sizes


def test_an_fb_without_an_exchange_records_both_halves_whole(monkeypatch: Any) -> None:
    """No all-to-all to hide (ep = 1): every forward is one graph, FB's halves included; with experts
    elsewhere, the FB halves are recorded part by part (four parts per layer)."""
    local = _recorded_parts(monkeypatch, elsewhere=False)
    assert local and set(local) == {1}
    exchanging = _recorded_parts(monkeypatch, elsewhere=True)
    assert len(exchanging) == len(local) and max(exchanging) > 4
    assert 1 in exchanging  # the warm-up forwards that no FB interleaves stay whole
