"""Execute one rank's pipeline action list: P2P transfers, F / B / W / BW and the overlapped FB.

The list comes from `schedules.py` with its SEND/RECV actions already placed; a run of consecutive
SEND/RECV actions is posted as one `batch_isend_irecv` and completed before the next compute action
(the contract in the schedules module docstring). Where two consecutive stages live on this rank
(DualPipeV's turn) the tensor is handed over in memory.

Backward for inputs (B) and for weights (W) are split with torch.distributed.pipelining's
`stage_backward_input` / `stage_backward_weight`, which stop the input-gradient pass at the
weights' inputs and finish the weight gradients later, without recomputing the graph.

Each compute action is recorded with its start and end (CUDA events on GPU, wall clock on CPU) for
the pipeline timeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from lightning_dsv3.model.transformer import LossOutput, Transformer
from lightning_dsv3.pipeline.schedules import Action, Op, PipelineSchedule

LossFn = Callable[[Transformer, torch.Tensor, torch.Tensor], LossOutput]


@dataclass
class ActionTiming:
    """One executed compute action: what ran and when (seconds from the start of the step)."""

    action: str
    start_s: float
    end_s: float


@dataclass
class _State:
    """Tensors alive between the actions of one step, keyed by (micro-batch, local chunk)."""

    inputs: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)
    outputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # output, or scaled loss
    acts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # received stage inputs
    grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # received output grads
    input_grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # to send back
    weight_work: dict[tuple[int, int], list[dict[str, Any]]] = field(default_factory=dict)
    losses: list[tuple[int, LossOutput]] = field(default_factory=list)


class PipelineRuntime:
    """Runs `schedule`'s list for pipeline rank `pp_rank` over this rank's `chunks`.

    Args:
        schedule: the schedule (SEND/RECV included).
        chunks: local model chunks, indexed like the schedule's chunks.
        pp_rank: this rank's position in the pipeline group.
        group: the pipeline process group; `global_rank(pp_rank)` maps its members to global ranks.
        loss_fn: (last-stage chunk, hidden, tokens) -> LossOutput.
    """

    def __init__(
        self,
        schedule: PipelineSchedule,
        chunks: list[Transformer],
        pp_rank: int,
        group: dist.ProcessGroup | None,
        global_rank: Callable[[int], int],
        loss_fn: LossFn,
    ) -> None:
        if len(chunks) != schedule.n_chunks:
            raise ValueError(
                f"the schedule has {schedule.n_chunks} chunks per rank, got {len(chunks)} modules"
            )
        self.schedule = schedule
        self.chunks = chunks
        self.rank = pp_rank
        self.group = group
        self.global_rank = global_rank
        self.loss_fn = loss_fn
        self.timings: list[ActionTiming] = []

    # ---- public ----------------------------------------------------------------------------------
    def run(self, microbatches: list[torch.Tensor], loss_scale: float) -> list[tuple[int, LossOutput]]:
        """Forward and backward of every micro-batch; returns the (micro-batch, loss) computed here.

        `loss_scale` multiplies each micro-batch loss before its backward (1 / micro-batches / accumulation).
        """
        return self._execute(self.schedule, microbatches, loss_scale, grad=True)

    def forward_only(
        self, schedule: PipelineSchedule, microbatches: list[torch.Tensor]
    ) -> list[tuple[int, LossOutput]]:
        """Run a forward-only list (see `forward_schedule`) under no_grad."""
        with torch.no_grad():
            return self._execute(schedule, microbatches, 1.0, grad=False)

    # ---- execution ------------------------------------------------------------------------------
    def _execute(
        self, schedule: PipelineSchedule, microbatches: list[torch.Tensor], loss_scale: float, grad: bool
    ) -> list[tuple[int, LossOutput]]:
        if len(microbatches) != schedule.n_microbatches:
            raise ValueError(
                f"the schedule runs {schedule.n_microbatches} micro-batches, got {len(microbatches)}"
            )
        self.timings = []
        self._t0 = time.perf_counter()
        state = _State()
        actions = schedule.actions[self.rank]
        i = 0
        while i < len(actions):
            if actions[i].op.is_comm:
                j = i
                while j < len(actions) and actions[j].op.is_comm:
                    j += 1
                self._communicate(actions[i:j], state, microbatches)
                i = j
                continue
            self._compute(schedule, actions[i], state, microbatches, loss_scale, grad)
            i += 1
        if state.outputs or state.weight_work:
            left = sorted(state.outputs) + sorted(state.weight_work)
            raise RuntimeError(f"pipeline rank {self.rank} finished its list with work left for {left[:4]}")
        return state.losses

    def _compute(
        self,
        schedule: PipelineSchedule,
        action: Action,
        state: _State,
        microbatches: list[torch.Tensor],
        loss_scale: float,
        grad: bool,
    ) -> None:
        start = time.perf_counter()
        op = action.op
        if op in (Op.F, Op.FB):
            self._forward(schedule, action.mb, action.chunk, state, microbatches, loss_scale, grad)
        if op is Op.FB:  # overlapped pair; numerically the forward then the full backward
            self._backward(schedule, action.mb2, action.chunk2, state, split=False)
        elif op in (Op.B, Op.BW):
            self._backward(schedule, action.mb, action.chunk, state, split=op is Op.B)
        elif op is Op.W:
            stage_backward_weight(
                self.chunks[action.chunk].parameters(), state.weight_work.pop((action.mb, action.chunk))
            )
        self.timings.append(ActionTiming(str(action), start - self._t0, time.perf_counter() - self._t0))

    def _forward(
        self,
        schedule: PipelineSchedule,
        mb: int,
        c: int,
        state: _State,
        microbatches: list[torch.Tensor],
        loss_scale: float,
        grad: bool,
    ) -> None:
        chunk, tokens = self.chunks[c], microbatches[mb]
        stage = schedule.stage_of(self.rank, c)
        if stage == 0:
            inp = None
            h = chunk.embed_tokens(tokens[:, :-1])
        else:
            inp = state.acts.pop((mb, c))
            if grad:
                inp.requires_grad_(True)
            h = inp
        out = chunk.run_layers(h)
        if stage == schedule.n_stages - 1:
            lo = self.loss_fn(chunk, out, tokens)
            state.losses.append((mb, lo))
            out = lo.loss * loss_scale
        else:
            nxt_rank, nxt_chunk = schedule.locate(mb, stage + 1)
            if nxt_rank == self.rank:
                state.acts[(mb, nxt_chunk)] = out.detach()
        if grad:
            state.inputs[(mb, c)] = inp
            state.outputs[(mb, c)] = out
        else:
            state.outputs[(mb, c)] = out.detach()
            if stage == schedule.n_stages - 1 or schedule.locate(mb, stage + 1)[0] == self.rank:
                state.outputs.pop((mb, c))  # nothing to send

    def _backward(self, schedule: PipelineSchedule, mb: int, c: int, state: _State, split: bool) -> None:
        out = state.outputs.pop((mb, c))
        inp = state.inputs.pop((mb, c))
        stage = schedule.stage_of(self.rank, c)
        grad_out = None if stage == schedule.n_stages - 1 else state.grads.pop((mb, c))
        if split and inp is not None:
            grads, work = stage_backward_input(
                [out], None if grad_out is None else [grad_out], [inp], self.chunks[c].parameters()
            )
            state.weight_work[(mb, c)] = work
            input_grad = grads[0]
        else:
            torch.autograd.backward(out, grad_out)
            input_grad = None if inp is None else inp.grad
            if split:  # the first stage has no input: its B is the whole backward and W has nothing left
                state.weight_work[(mb, c)] = []
        if stage > 0:
            prev_rank, prev_chunk = schedule.locate(mb, stage - 1)
            if prev_rank == self.rank:
                state.grads[(mb, prev_chunk)] = input_grad
            else:
                state.input_grads[(mb, c)] = input_grad

    def _communicate(
        self, actions: tuple[Action, ...], state: _State, microbatches: list[torch.Tensor]
    ) -> None:
        ops = []
        for a in actions:
            peer = self.global_rank(a.peer)
            key = (a.mb, a.chunk)
            if a.op is Op.SEND_ACT:
                ops.append(dist.P2POp(dist.isend, state.outputs[key].detach().contiguous(), peer, self.group))
                if not torch.is_grad_enabled():
                    state.outputs.pop(key)
            elif a.op is Op.SEND_GRAD:
                ops.append(dist.P2POp(dist.isend, state.input_grads.pop(key).contiguous(), peer, self.group))
            else:
                buf = self._hidden_buffer(microbatches[a.mb])
                (state.acts if a.op is Op.RECV_ACT else state.grads)[key] = buf
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group))
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    def _hidden_buffer(self, tokens: torch.Tensor) -> torch.Tensor:
        """A receive buffer for one micro-batch's hidden state: (batch, seq, dim)."""
        chunk = self.chunks[0]
        weight = next(chunk.parameters())
        return torch.empty(
            tokens.shape[0], tokens.shape[1] - 1, chunk.config.dim, dtype=weight.dtype, device=weight.device
        )


def forward_schedule(schedule: PipelineSchedule) -> PipelineSchedule:
    """A forward-only list over the same layout (validation and test): every micro-batch in the
    first direction, each rank running its chunks' forwards in stage order, GPipe style."""
    from lightning_dsv3.pipeline.schedules import insert_communication

    direction = schedule.chunk_directions[0]
    chunks = [c for c in range(schedule.n_chunks) if schedule.chunk_directions[c] == direction]
    actions = []
    for rank in range(schedule.pp):
        order = sorted(chunks, key=lambda c: schedule.stage_of(rank, c))
        actions.append(tuple(Action(Op.F, mb, c) for c in order for mb in range(schedule.n_microbatches)))
    plain = PipelineSchedule(
        name=f"{schedule.name}-forward",
        pp=schedule.pp,
        n_microbatches=schedule.n_microbatches,
        n_chunks=schedule.n_chunks,
        n_stages=schedule.n_stages,
        stage_map=schedule.stage_map,
        chunk_directions=schedule.chunk_directions,
        mb_directions=(direction,) * schedule.n_microbatches,
        actions=tuple(actions),
    )
    return insert_communication(plain)
