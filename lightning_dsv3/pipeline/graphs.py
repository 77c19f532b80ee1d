"""CUDA graphs of a pipeline chunk's decoder layers, one set per micro-batch in flight.

A pipeline stage on small micro-batches is bound by the host: one compiled chunk of mini (embedding and
seven layers) launches about 820 kernels per forward and backward, 30 ms of host time against 7 ms of
kernels at 2 x 1024 tokens (`benchmarks/part_calls.py`). CUDA graphs replay a layer's kernels in one
launch, but torch.compile's ("reduce-overhead", CUDA graph trees) cannot serve a pipeline: a stage runs
the forwards of several micro-batches before their backwards, and a replay overwrites the outputs and
saved activations of the previous one (measured: "accessing tensor output of CUDAGraphs that has been
overwritten by a subsequent run").

So each chunk gets `slots` independent captures of its layers, one per micro-batch the schedule keeps
in flight on it at most (`slots_needed`), as Megatron-Core's CUDA graph manager does: a forward takes a
free slot, whose graphs hold that micro-batch's activations until its backward gives the slot back.
Each slot is one `torch.cuda.make_graphed_callables` call over the chunk's layers in order, so their
forward and backward graphs share one memory pool and replay in the order they were captured. The
runtime captures them as a step starts, before any of its sends and receives (`capture_for`).

Only what a graph can hold is graphed: decoder layers without a host synchronisation (no expert
all-to-all, whose split sizes the host must read; routed experts on the grouped GEMM, bf16 on a
Hopper-class GPU), compiled (one backward node per layer, so the schedule's B runs whole), without
activation checkpointing of any kind. Under autocast (bf16-mixed) the capture runs with autocast's
cast cache off, as `make_graphed_callables` requires: each replay casts the weights again, inside the
graph. The embedding, the loss and the MTP modules run as before.

What a replay does not see, and how this copes:
- the parameters' and buffers' addresses are baked in: a step whose addresses differ from the capture's
  (weights loaded with `assign=True`, ZeRO-1 repointing them) captures again, as does a new input shape or
  a new aux-loss scale (a Python number read at capture);
- autocast's state and dtype, which parameters require gradients (and which objects they are), and
  train or eval mode are baked in too: a step that changes any of them captures again, with a warning
  (a capture every step would cost more than it saves);
- a graph's outputs and gradients live in its static buffers: the runtime copies the chunk's input
  gradient before handing it on, and `prepare_step` gives every parameter a gradient before the first
  backward, so autograd adds into it instead of adopting a static buffer as `.grad` (which the next
  micro-batch's replay would overwrite);
- warm-up and capture run the layers on random input: the buffers they update (the router's expert
  load) are put back afterwards, and `make_graphed_callables` takes gradients with `autograd.grad`,
  leaving `.grad` alone. A Python attribute set in a layer's forward is set at capture only:
  `Block.last_aux_loss` of a graphed layer keeps a tensor of its capture.

Memory: each capture holds, besides the activations a micro-batch keeps anyway, a static gradient for
every parameter of its layers and static input and output buffers, so a slot should cost up to the
chunk's layer parameters once more (in their dtype; not measured apart). Measured as a whole through
Trainer on mini at pp=2 with DualPipe (8 micro-batches of 2 x 1024): 19.9 GiB peak with graphs, with
nothing held before the fit; 17.9 GiB without graphs in an earlier run (which may count memory an
earlier variant in the same process still held) (README, Measured). The planner's memory model does
not count the slots yet.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_dsv3.model.moe import GroupedExperts
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.pipeline.schedules import Action, Op

# torch.cuda.make_graphed_callables' signature: (modules, sample args per module) -> graphed modules
GraphMaker = Callable[..., Any]


def slots_needed(actions: Sequence[Action], n_chunks: int) -> list[int]:
    """The most micro-batches each local chunk holds between its forward and its backward in `actions`.

    An FB counts its forward before its backward ends (the runtime may interleave the two halves).
    """
    live, most = [0] * n_chunks, [0] * n_chunks
    for a in actions:
        if a.op in (Op.F, Op.FB):
            live[a.chunk] += 1
            most[a.chunk] = max(most[a.chunk], live[a.chunk])
        if a.op in (Op.B, Op.BW):
            live[a.chunk] -= 1
        elif a.op is Op.FB:
            live[a.chunk2] -= 1
    return most


def graphs_ineligible(chunk: Transformer, exchanges: bool, device: torch.device) -> str | None:
    """Why `chunk`'s layers cannot be graphed here (None: they can)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if exchanges:
        return "the expert all-to-all reads its split sizes on the host, which a CUDA graph cannot"
    if not chunk.parts_compiled:
        return "graphed layers must be compiled (compile=...), so that the schedule's B runs whole"
    if chunk.config.activation_checkpointing != "none":
        return "activation checkpointing recomputes or frees inside the backward; run it without CUDA graphs"
    return None


def experts_off_grouped_gemm(chunk: Transformer) -> str | None:
    """Why `chunk`'s routed experts would read the expert counts on the host in the current autocast
    state (None: they run the grouped GEMM, which a graph can hold)."""
    if any(experts.reads_counts_on_host() for experts in _routed_experts(chunk)):
        return (
            "the routed experts run without the grouped GEMM (bf16 operands on a Hopper-class GPU), "
            "whose fallback reads the expert counts on the host"
        )
    return None


def _routed_experts(chunk: Transformer) -> list[GroupedExperts]:
    return [e for b in chunk.blocks() if (e := getattr(b.ffn, "experts", None)) is not None]


class _Layer(nn.Module):
    """One decoder layer seen through one slot: `make_graphed_callables` patches this module's forward,
    so each slot's capture of a layer needs its own module around the shared block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.block(x, cos, sin)


class ChunkGraphs:
    """Per-slot CUDA graphs of `chunk`'s decoder layers (see the module docstring).

    Args:
        chunk: the pipeline chunk whose layers to graph.
        slots: how many micro-batches the schedule keeps in flight on it at most (`slots_needed`).
        make_graphed: `torch.cuda.make_graphed_callables` (replaceable to test the bookkeeping on CPU).
    """

    def __init__(self, chunk: Transformer, slots: int, make_graphed: GraphMaker | None = None) -> None:
        if slots < 1:
            raise ValueError(f"a graphed chunk needs at least one slot, got {slots}")
        self.chunk = chunk
        self.slots = slots
        self.make_graphed = make_graphed or torch.cuda.make_graphed_callables
        self.captures = 0  # how many times the layers were captured
        self._free = list(range(slots))
        self._layers: list[tuple[nn.Module, ...]] = []  # per slot, the graphed layers in order
        self._shape: tuple[torch.Size, torch.dtype] | None = None  # the input they were captured for
        self._key: tuple[Any, ...] | None = None
        self._blocked: str | None = None  # `prepare_step`'s answer for `_key`
        self._dropped = False  # `drop` freed the captures: the next one is no recapture to warn of

    def acquire(self) -> int:
        """A free slot for a micro-batch's forward; given back by `release` after its backward."""
        if not self._free:
            raise RuntimeError(
                f"all {self.slots} CUDA graph slots of this chunk hold a micro-batch: the schedule keeps "
                "more in flight than `slots_needed` counted"
            )
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def prepare_step(self) -> str | None:
        """Before a step's first forward: every slot free (a step that raised may have left some
        taken), every parameter with a gradient tensor (see the module docstring), and the captures
        dropped if anything they baked in changed. Returns why the layers cannot be graphed in this
        step's precision (`experts_off_grouped_gemm`, read again only when that changes), else None."""
        self._free = list(range(self.slots))
        params = list(self.chunk.parameters())
        for p in params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        key = (
            tuple((id(p), p.data_ptr(), p.requires_grad) for p in params),
            tuple(b.data_ptr() for b in self.chunk.buffers()),
            tuple(b.aux_loss_scale for b in self.chunk.blocks()),
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            self.chunk.training,
        )
        if key != self._key:
            self._forget_captures()
            self._key, self._blocked = key, experts_off_grouped_gemm(self.chunk)
        return self._blocked

    def capture_for(self, h: torch.Tensor) -> None:
        """Capture every slot for hidden states shaped and typed like `h` (a meta tensor will do),
        unless done already. The runtime calls it as a step starts, before any of the step's sends and
        receives: a capture then never runs beside NCCL's work, and a peer waiting for this rank's
        output waits at the step's start, not in its middle."""
        if not self._layers or self._shape != (h.shape, h.dtype):
            self._capture(h)

    def run_layers(self, slot: int, h: torch.Tensor) -> torch.Tensor:
        """`chunk.run_layers(h)` through `slot`'s graphs (captured here if `capture_for` was not)."""
        self.capture_for(h)
        cos, sin = self.chunk.rope(h.shape[1])
        for layer in self._layers[slot]:
            h = layer(h, cos, sin)
        return h

    def drop(self) -> None:
        """Free the captures' memory (the strategy's teardown); a later step captures again, without
        the warning of a capture that something changed forced."""
        self._forget_captures()
        self._dropped = True

    def _forget_captures(self) -> None:
        """Forget the captures and free their memory now, not at some later garbage collection: each
        graphed module's patched forward refers to the module itself (cut here), and the autograd
        Function holding the graphs and their static buffers is a class `make_graphed_callables` makes
        per capture, which like every class sits in a reference cycle (one collection frees it)."""
        if not self._layers:
            return
        for layers in self._layers:
            for layer in layers:
                layer.__dict__.pop("forward", None)
        self._layers = []
        self._shape = None  # a capture that raises part-way leaves no slot list to trust
        gc.collect()

    def _capture(self, h: torch.Tensor) -> None:
        """Capture every slot's layers for inputs shaped like `h`, leaving buffers as they were."""
        if self.captures and not self._dropped:
            warnings.warn(
                f"capturing a pipeline chunk's CUDA graphs again (capture {self.captures + 1}): its "
                "weights, their gradient flags, the aux-loss scale, autocast, train/eval mode or the "
                "micro-batch shape changed since the last; a capture every step costs more than it saves",
                stacklevel=4,
            )
        self._forget_captures()
        self._dropped = False
        cos, sin = self.chunk.rope(h.shape[1])
        blocks = list(self.chunk.blocks())
        saved = [b.detach().clone() for b in self.chunk.buffers()]
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # a cached cast would outlive the graph's memory
        try:
            for _ in range(self.slots):
                layers = tuple(_Layer(b).train(self.chunk.training) for b in blocks)
                samples = tuple(
                    (torch.randn(h.shape, dtype=h.dtype, device=cos.device).requires_grad_(True), cos, sin)
                    for _ in layers
                )
                try:
                    graphed = self.make_graphed(layers, samples, allow_unused_input=True)
                except RuntimeError as err:
                    raise RuntimeError(
                        f"capturing the CUDA graphs of pipeline layers {self.chunk.layer_ids} failed: a "
                        "layer synchronises with the host or is not capturable. Train with compile=True "
                        "(compiled, no graphs), or compile=False"
                    ) from err
                self._layers.append(tuple(graphed))
        finally:
            torch.set_autocast_cache_enabled(cache)
        self._shape = (h.shape, h.dtype)
        with torch.no_grad():
            for b, s in zip(self.chunk.buffers(), saved):
                b.copy_(s)
        self.captures += 1
