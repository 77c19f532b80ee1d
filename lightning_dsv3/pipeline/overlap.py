"""Part-wise forward and backward of a model chunk, so two micro-batches can be interleaved.

A chunk's forward is recorded as a *tape* of parts, one autograd graph each, cut at the layer's
four parts (attention, dispatch, mlp, combine) plus the embedding and the loss. The tensors that
cross a cut become leaves, so the backward can run one part at a time, newest first, and hand each
part's input gradients to the part that produced those inputs. A forward that nothing interleaves,
or whose FB has no all-to-all to hide (no expert parallelism), is recorded as a tape of one part,
the whole chunk (`whole=True`).

DeepSeek's overlapped forward&backward (the FB action) then steps the forward of one micro-batch and
the backward of another in lockstep: a forward part and a backward part per step. Walking a layer's
parts forwards (compute, comm, compute, comm) against another layer's parts backwards (comm,
compute, comm, compute), every step pairs one micro-batch's all-to-all with the other's compute. On
GPUs the communication parts run on their own CUDA stream and each micro-batch's parts are chained
by events, so the pair really runs at once; on CPUs the same order runs serially and gives the same
numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_dsv3.model.block import Block
from lightning_dsv3.model.moe import LocalDispatcher, MoE
from lightning_dsv3.model.transformer import LossOutput, Transformer

COMM, COMPUTE = "comm", "compute"


@dataclass
class PartRecord:
    """When one part ran, for the timeline and the overlap check (CUDA events, or None on CPU)."""

    name: str
    stream: str
    start: Any
    end: Any


@dataclass
class _Part:
    name: str
    stream: str
    inputs: list[torch.Tensor]  # leaves that received the previous part's outputs
    outputs: list[torch.Tensor]
    params: list[nn.Parameter]
    weight_work: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (outputs, seeds) kept for W
    # False where a W walking this part's graph again would repeat an expert all-to-all: B runs it whole
    splittable: bool = True


@dataclass
class Tape:
    """The recorded forward of one (micro-batch, chunk); `backward_parts` walks it newest first."""

    parts: list[_Part] = field(default_factory=list)
    # the chunk's parts are compiled: each is one backward node that computes input and weight gradients
    # together, so a split backward would run it twice (B, then W); B runs it whole and W has nothing left
    whole_backward: bool = False
    sources: dict[int, torch.Tensor] = field(default_factory=dict)  # id(leaf) -> the output it was cut from
    chunk_input: torch.Tensor | None = None  # the received hidden state (None on the first stage)
    output: torch.Tensor | None = None  # the hidden state sent on, or the scaled loss
    loss: LossOutput | None = None
    input_grad: torch.Tensor | None = None  # set by the backward: the gradient of `chunk_input`

    def leaf(self, t: torch.Tensor) -> torch.Tensor:
        """Cut `t` from its graph: a new leaf whose gradient goes back to `t` in the backward."""
        leaf = t.detach().requires_grad_(t.requires_grad)
        self.sources[id(leaf)] = t
        return leaf

    def backward_parts(
        self, grad_output: torch.Tensor | None, split: bool, streams: Streams, chain: Chain
    ) -> Iterator[str]:
        """Backward one part per step (yielding its stream kind); `split` defers weight gradients.

        Gradients flow between parts through a map from each cut output to its gradient.
        """
        split = split and not self.whole_backward
        grads: dict[int, torch.Tensor] = {}
        if grad_output is not None:
            grads[id(self.output)] = grad_output
        for part in reversed(self.parts):
            pairs = [(o, grads.pop(id(o), None)) for o in part.outputs]
            pairs = [(o, g) for o, g in pairs if o.requires_grad and (g is not None or o.dim() == 0)]
            with streams.part(part.stream, chain, f"{part.name}.backward"):
                if pairs:
                    outs = [o for o, _ in pairs]
                    seeds = [g if g is not None else torch.ones_like(o) for o, g in pairs]
                    grad_inputs = self._run_backward(part, outs, seeds, split)
                    streams.share(*grad_inputs)
                    for leaf, g in zip(part.inputs, grad_inputs):
                        if g is not None:
                            key = id(self.sources.get(id(leaf), leaf))
                            grads[key] = grads[key] + g if key in grads else g
            yield part.stream
        self.input_grad = grads.get(id(self.chunk_input)) if self.chunk_input is not None else None

    @staticmethod
    def _run_backward(
        part: _Part, outs: list[torch.Tensor], seeds: list[torch.Tensor], split: bool
    ) -> list[torch.Tensor | None]:
        if split and part.splittable and part.params and part.inputs:
            # B: input gradients now, keeping the graph; W walks it again for the weights. (torch's
            # stage_backward_input would stop at the weights' inputs, but it detaches outputs in
            # place and our parts return views.)
            grads = torch.autograd.grad(outs, part.inputs, seeds, retain_graph=True, allow_unused=True)
            part.weight_work = (outs, seeds)
            return list(grads)
        for leaf in part.inputs:
            leaf.grad = None
        torch.autograd.backward(outs, seeds)
        return [leaf.grad for leaf in part.inputs]

    def backward_weights(self) -> None:
        """The deferred weight gradients of a split backward (the W action)."""
        for part in self.parts:
            if part.weight_work is not None:
                outs, seeds = part.weight_work
                used = [p for p in part.params if p.requires_grad]
                torch.autograd.backward(outs, seeds, inputs=used)
                part.weight_work = None


@dataclass
class Chain:
    """The last event of one micro-batch's parts: its next part waits for it, on whichever stream."""

    last: Any = None
    stream: Any = None  # the stream `last` was recorded on (a part there needs no wait)


class Streams:
    """A compute and a communication stream on GPUs; every part waits only for its own micro-batch's
    previous part, so parts of two micro-batches on different streams run at once. No-ops on CPU."""

    def __init__(self, device: torch.device, record: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.record = record and self.cuda
        self.records: list[PartRecord] = []
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.comm = torch.cuda.Stream(device)

    @contextmanager
    def part(self, kind: str, chain: Chain, name: str) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        stream = self.comm if kind == COMM else self.compute
        if chain.last is not None and chain.stream is not stream:  # one stream runs in order anyway
            stream.wait_event(chain.last)
        start = None
        if self.record:
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
        with torch.cuda.stream(stream):
            yield
        end = torch.cuda.Event(enable_timing=self.record)
        end.record(stream)
        chain.last, chain.stream = end, stream
        if self.record:
            self.records.append(PartRecord(name, kind, start, end))

    def join(self, chain: Chain) -> None:
        """Make the compute stream (where NCCL's sends and receives are ordered, and where the caller
        reads results) wait for the last part of `chain`, which may have run on the comm stream."""
        if self.cuda and chain.last is not None and chain.stream is not self.compute:
            self.compute.wait_event(chain.last)

    def resume(self, chain: Chain) -> None:
        """Order `chain`'s next part after everything queued on the compute stream so far: a received
        activation or gradient lands there, and the next part may run on the comm stream."""
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.compute)
            chain.last, chain.stream = event, self.compute

    def share(self, *tensors: torch.Tensor | None) -> None:
        """Mark tensors that one stream made and the other reads as in use by both, so the caching
        allocator does not hand their memory to the other stream while work on them is queued."""
        if self.cuda:
            for t in tensors:
                if t is not None and t.is_cuda:
                    t.record_stream(self.compute)
                    t.record_stream(self.comm)


ParamCache = dict[tuple[nn.Module, str], list[nn.Parameter]]


def _cached(cache: ParamCache | None, module: nn.Module, part: str, find: Callable[[], list]) -> list:
    """`find()`, remembered in `cache` (if given) under (module, part): walking a module's children
    for its parameters costs more host time than running a small part."""
    if cache is None:
        return find()
    key = (module, part)
    if key not in cache:
        cache[key] = find()
    return cache[key]


def _block_params(block: Block, part: str) -> list[nn.Parameter]:
    if part == "attention":
        mods = [block.attn_norm, block.attn, block.ffn_norm]
        if block.is_moe:
            mods.append(block.ffn.router)
        return [p for m in mods for p in m.parameters()]
    if part == "mlp":
        if not block.is_moe:
            return list(block.ffn.parameters())
        mods = [block.ffn.experts] + (
            [block.ffn.shared_experts] if block.ffn.shared_experts is not None else []
        )
        return [p for m in mods for p in m.parameters()]
    return []


def forward_parts(
    chunk: Transformer,
    tape: Tape,
    first_input: torch.Tensor,
    tokens: torch.Tensor,
    is_first: bool,
    is_last: bool,
    loss_fn: Callable[[Transformer, torch.Tensor, torch.Tensor], LossOutput],
    loss_scale: float,
    streams: Streams,
    chain: Chain,
    params: ParamCache | None = None,
    whole: bool = False,
    run_layers: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[str]:
    """Forward `chunk` one part per step, recording `tape` (yields each part's stream kind).

    `first_input` is the received hidden state, or the token ids on the first stage. `params` keeps
    each part's parameter list between calls (the caller empties it when parameters may change).

    `whole` records the chunk as one part, one autograd graph: for a micro-batch that no FB interleaves,
    or whose FB has no all-to-all to hide, the cut buys nothing and costs host time, which bounds a
    pipeline stage on small micro-batches (a compiled layer runs as one graph instead of two plus two
    eager parts, the backward is one autograd call instead of four per layer, and no cut tensors are
    kept). B and W still split it (B keeps the graph, W walks it for the weights) as they split a part.
    A whole forward runs the decoder layers through `run_layers` when given (one slot's CUDA graphs,
    `pipeline.graphs`), else through `chunk.run_layers`.
    """
    tape.whole_backward = chunk.parts_compiled
    if whole:
        tape.chunk_input = None if is_first else first_input
        with streams.part(COMPUTE, chain, "chunk"):
            h = (run_layers or chunk.run_layers)(chunk.embed_tokens(first_input) if is_first else first_input)
            if is_last:
                tape.loss = loss_fn(chunk, h, tokens)
                h = tape.loss.loss * loss_scale
        chunk_params = _cached(params, chunk, "whole", lambda: list(chunk.parameters()))
        tape.parts.append(_Part("chunk", COMPUTE, [] if is_first else [first_input], [h], chunk_params))
        tape.output = h
        yield COMPUTE
        return
    if is_first:
        with streams.part(COMPUTE, chain, "embed"):
            h = chunk.embed_tokens(first_input)
        embed_params = _cached(params, chunk, "embed", lambda: list(chunk.embed.parameters()))
        tape.parts.append(_Part("embed", COMPUTE, [], [h], embed_params))
        yield COMPUTE
    else:
        tape.chunk_input = first_input
        h = first_input
    cos, sin = chunk.rope(h.shape[1])
    for block in chunk.blocks():
        yield from _layer_parts(block, h, cos, sin, tape, streams, chain, params)
        h = tape.parts[-1].outputs[0]
    if is_last:
        leaf = tape.leaf(h)
        with streams.part(COMPUTE, chain, "loss"):
            tape.loss = loss_fn(chunk, leaf, tokens)
            loss = tape.loss.loss * loss_scale
        head_params = _cached(
            params,
            chunk,
            "loss",
            lambda: [p for name, p in chunk.named_parameters() if not name.startswith("layers.")],
        )
        # the MTP layers run inside the loss part: with their experts' exchange, B runs it whole
        tape.parts.append(
            _Part("loss", COMPUTE, [leaf], [loss], head_params, splittable=not exchanges_tokens(chunk.mtp))
        )
        tape.output = loss
        yield COMPUTE
    else:
        tape.output = h


def exchanges_tokens(modules: nn.Module) -> bool:
    """Whether any MoE layer inside `modules` moves its tokens to other ranks (expert parallelism)."""
    return any(
        isinstance(m, MoE) and not isinstance(m.dispatcher, LocalDispatcher) for m in modules.modules()
    )


def _layer_parts(
    block: Block,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    tape: Tape,
    streams: Streams,
    chain: Chain,
    params: ParamCache | None = None,
) -> Iterator[str]:
    """The four parts of one layer; each part's outputs become leaves of the parts that read them."""
    name = f"L{block.layer_id}"
    x_in = tape.leaf(h)
    with streams.part(COMPUTE, chain, f"{name}.attention"):
        st = block.attention(x_in, cos, sin)
    outs = [st.h, st.x] + ([st.routing.weights, st.routed] if block.is_moe else [])
    attn_params = _cached(params, block, "attention", lambda: _block_params(block, "attention"))
    tape.parts.append(_Part(f"{name}.attention", COMPUTE, [x_in], outs, attn_params))
    streams.share(*outs, st.order)  # dispatch and combine read the routing order on the comm stream
    st.h, st.x = tape.leaf(st.h), tape.leaf(st.x)
    if block.is_moe:
        st.routing.weights, st.routed = tape.leaf(st.routing.weights), tape.leaf(st.routed)
    yield COMPUTE

    with streams.part(COMM, chain, f"{name}.dispatch"):
        st = block.dispatch(st)
    if block.is_moe:
        tape.parts.append(_Part(f"{name}.dispatch", COMM, [st.routed], [st.received], []))
        streams.share(st.received)
        st.received = tape.leaf(st.received)
    yield COMM

    mlp_in = [st.received, st.x] if block.is_moe else [st.x]
    with streams.part(COMPUTE, chain, f"{name}.mlp"):
        st = block.mlp(st)
    mlp_out = [t for t in (st.expert_out, st.ffn_out) if t is not None]
    mlp_params = _cached(params, block, "mlp", lambda: _block_params(block, "mlp"))
    tape.parts.append(_Part(f"{name}.mlp", COMPUTE, mlp_in, mlp_out, mlp_params))
    streams.share(*mlp_out)
    st.expert_out = tape.leaf(st.expert_out) if st.expert_out is not None else None
    st.ffn_out = tape.leaf(st.ffn_out) if st.ffn_out is not None else None
    yield COMPUTE

    comb_in = [t for t in (st.expert_out, st.ffn_out, st.h) if t is not None]
    if block.is_moe:
        comb_in.append(st.routing.weights)
    with streams.part(COMM, chain, f"{name}.combine"):
        out = block.combine(st)
    tape.parts.append(_Part(f"{name}.combine", COMM, comb_in, [out], []))
    streams.share(out)
    yield COMM


def lockstep(first: Iterator[str], second: Iterator[str]) -> None:
    """Advance two part generators alternately (second, then first) until both are done."""
    done_a = done_b = False
    while not (done_a and done_b):
        if not done_b:
            done_b = next(second, None) is None
        if not done_a:
            done_a = next(first, None) is None
