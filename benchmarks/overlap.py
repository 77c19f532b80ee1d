"""Does the overlapped forward&backward (FB) really run one micro-batch's exchange during the other's
compute? One device, MoE layers of a preset, and a stand-in exchange that moves the same bytes as
the all-to-all would (a device-to-device copy on the communication stream).

For FB = forward(mb 1) interleaved with backward(mb 0) it records every part with CUDA events and
reports: the fraction of communication-stream time that overlaps compute-stream time of the other
micro-batch, and the FB step time against running the same parts on one stream.

    python benchmarks/overlap.py                         # GPU, mini preset
    python benchmarks/overlap.py --preset debug --tokens 256   # CPU small mode (no streams: overlap 0)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.local_exchange import CopyExchange
from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3.config import get_preset
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.pipeline.overlap import COMM, Chain, Streams, Tape, forward_parts, lockstep


def _intervals(streams: Streams) -> list[tuple[str, str, float, float]]:
    base = streams.records[0].start
    return [(r.name, r.stream, base.elapsed_time(r.start), base.elapsed_time(r.end)) for r in streams.records]


def _overlap_fraction(spans: list[tuple[str, str, float, float]]) -> float:
    """Share of comm-part time of one micro-batch covered by compute parts of the other."""
    comm = [(n, s, e) for n, k, s, e in spans if k == COMM]
    compute = [(n, s, e) for n, k, s, e in spans if k != COMM]
    total = covered = 0.0
    for name, s, e in comm:
        total += e - s
        other = [(cs, ce) for cn, cs, ce in compute if cn.endswith(".backward") != name.endswith(".backward")]
        covered += sum(max(0.0, min(e, ce) - max(s, cs)) for cs, ce in other)
    return covered / total if total else 0.0


def run_fb(chunk: Transformer, x: torch.Tensor, streams: Streams) -> float:
    """One FB: forward(mb 1) in lockstep with backward(mb 0). Returns milliseconds (wall on CPU)."""
    tape0 = Tape()
    for _ in forward_parts(
        chunk, tape0, x.clone().requires_grad_(), None, False, False, None, 1.0, streams, Chain()
    ):
        pass
    grad = torch.randn_like(tape0.output)
    tape1 = Tape()
    streams.records.clear()
    start = torch.cuda.Event(enable_timing=True) if streams.cuda else None
    end = torch.cuda.Event(enable_timing=True) if streams.cuda else None
    if start is not None:
        torch.cuda.synchronize()
        start.record()
    fwd = forward_parts(
        chunk, tape1, x.clone().requires_grad_(), None, False, False, None, 1.0, streams, Chain()
    )
    lockstep(fwd, tape0.backward_parts(grad, False, streams, Chain()))
    if end is not None:
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--layers", type=int, default=4, help="MoE layers in the chunk")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = get_preset(args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len)
    first = config.n_dense_layers
    chunk = Transformer(config, range(first, first + args.layers), with_embedding=False, with_head=False)
    chunk.init_weights(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chunk = chunk.to(device=device, dtype=dtype)
    for _, moe in chunk.moe_layers():
        moe.dispatcher = CopyExchange()
    batch = max(1, args.tokens // args.seq_len)
    seq = min(args.seq_len, args.tokens)
    x = torch.randn(batch, seq, config.dim, device=device, dtype=dtype)

    rows = []
    for label, overlapped in (("two streams (overlapped)", True), ("one stream (serial)", False)):
        streams = Streams(device, record=True)
        if streams.cuda and not overlapped:
            streams.comm = streams.compute
        times, fractions = [], []
        for rep in range(args.reps + 2):
            ms = run_fb(chunk, x, streams)
            if rep >= 2 and streams.cuda:
                times.append(ms)
                fractions.append(_overlap_fraction(_intervals(streams)))
        ms = statistics.median(times) if times else float("nan")
        frac = statistics.median(fractions) if fractions else 0.0
        rows.append([label, f"{ms:.2f}", f"{frac:.1%}"])
    payload_mib = batch * seq * config.n_activated_experts * config.dim * x.element_size() / 2**20
    body = (
        f"preset {args.preset}, {args.layers} MoE layers, {batch}x{seq} tokens per micro-batch, "
        f"stand-in exchange of {payload_mib:.1f} MiB per dispatch and per combine\n\n"
        + markdown_table(
            ["FB of two micro-batches", "ms (median)", "comm time overlapped by the other's compute"], rows
        )
    )
    write_result(f"overlap-{args.preset}", body)


if __name__ == "__main__":
    main()
