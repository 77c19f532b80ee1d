"""A decoder layer's residual add and RMSNorm alone, forward and backward: near HBM bandwidth or not?

A profile of mini's training step (batch 32 x 1024, `end_to_end --profile`) spends about 13 ms a
step in Inductor kernels named after RMSNorm (which also fuse gathers and casts around it). This times
the pattern alone, h = x + a and n = RMSNorm(h) (x the residual stream, a a bf16 branch output, n the
bf16 input of the next GEMMs; each layer adds into its residual twice and normalises it twice),
forward and backward on `--tokens` rows of `--dim`, three ways:

  eager      aten's ops (its fused RMSNorm kernels on GPUs)
  compiled   torch.compile's default mode: Inductor fuses the add into its own norm kernels
  aten norm  compiled, with aten's fused RMSNorm forward and backward kept whole inside the graph as
             two opaque custom ops (GPU only: aten's fused RMSNorm backward has no CPU kernel)

with the residual stream in fp32 (what bf16-mixed training keeps: fp32 embeddings) and in bf16. Each
row gives the device time of a forward and backward (the kernels' sum; the host clock on CPUs), the
bytes it must move at least (`min_bytes`), and the rate that makes against a device-to-device copy's,
timed the same way in the same process (a reference, not a ceiling: a kernel that reads more than it
writes can beat it). Gradients are taken with `torch.autograd.grad`, so no leaf's `.grad` accumulates.

    python -m benchmarks.norm_kernels                               # 32768 rows of 1024, on a GPU
    python -m benchmarks.norm_kernels --tokens 512 --dim 64 --reps 2   # CPU small mode
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.profile_step import device_ms, kernel_ms
from benchmarks.results_io import markdown_table, write_result

EPS = 1e-6


@torch.library.custom_op("dsv3_bench::fused_rms_norm", mutates_args=())
def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """aten's fused RMSNorm over the last dimension, opaque to Inductor: (normalised x, rstd)."""
    out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
    return out, rstd


@fused_rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)  # aten's meta kernel


@torch.library.custom_op("dsv3_bench::fused_rms_norm_backward", mutates_args=())
def fused_rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """aten's fused RMSNorm backward, opaque to Inductor (which would otherwise decompose it into its
    own kernels): (input gradient, weight gradient)."""
    dx, dw = torch.ops.aten._fused_rms_norm_backward(grad, x, [x.shape[-1]], rstd, weight, [True, True])
    return dx, dw


@fused_rms_norm_backward.register_fake
def _(
    grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _save(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[torch.Tensor, torch.Tensor, float],
    output: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _grad_rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, None]:
    x, weight, rstd = ctx.saved_tensors
    dx, dw = fused_rms_norm_backward(grad.contiguous(), x, rstd, weight)
    return dx, dw, None


fused_rms_norm.register_autograd(_backward, setup_context=_save)


def add_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + a; (h, RMSNorm(h) in bf16), the weight cast to h's dtype as `model.norm.RMSNorm` does."""
    h = x + a
    return h, F.rms_norm(h, (h.shape[-1],), weight.to(h.dtype), EPS).to(torch.bfloat16)


def add_norm_aten(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_norm` with aten's fused RMSNorm as opaque ops (forward and backward)."""
    h = x + a
    return h, fused_rms_norm(h, weight.to(h.dtype), EPS)[0].to(torch.bfloat16)


def ways(device: torch.device) -> dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]]:
    """The ways this device runs (the module docstring's list)."""
    found = {"eager": add_norm, "compiled": torch.compile(add_norm)}
    if device.type == "cuda":
        found["aten norm"] = torch.compile(add_norm_aten)
    return found


def min_bytes(tokens: int, dim: int, residual: torch.dtype) -> int:
    """What a forward and backward must move: x and a read, h and n written; dh, dn and h read, the
    residual's gradient written, and a's gradient, its own bf16 tensor unless the residual is bf16
    (then autograd hands the one gradient to both). rstd and the weight's gradient, a value and a
    weight per row at most, are left out."""
    r, b = torch.empty((), dtype=residual).element_size(), 2
    grad_a = b if residual != torch.bfloat16 else 0
    return tokens * dim * ((r + b + r + b) + (r + b + r + r + grad_a))


def copy_gbps(nbytes: int, device: torch.device, reps: int) -> float:
    """A device-to-device copy's rate, bytes read and written per second / 1e9, timed as the rows are
    (`device_ms`)."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / device_ms(lambda: dst.copy_(src), device, reps) / 1e6


def forward_backward(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    a: torch.Tensor,
    weight: torch.Tensor,
) -> Callable[[], object]:
    """One forward and backward of `fn` against fixed random output gradients, as a call to time."""
    dh, dn = torch.randn_like(x), torch.randn_like(a)
    return lambda: torch.autograd.grad(fn(x, a, weight), (x, a, weight), (dh, dn))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=32 * 1024, help="rows: batch x sequence")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy = copy_gbps(args.tokens * args.dim * 4, device, args.reps)
    rows, kernels = [], []
    for residual in (torch.float32, torch.bfloat16):
        x = torch.randn(args.tokens, args.dim, device=device, dtype=residual, requires_grad=True)
        a = torch.randn(args.tokens, args.dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.ones(args.dim, device=device, requires_grad=True)
        nbytes = min_bytes(args.tokens, args.dim, residual)
        dtype = str(residual).removeprefix("torch.")
        for name, fn in ways(device).items():
            step = forward_backward(fn, x, a, weight)
            ms = device_ms(step, device, args.reps)
            rate = nbytes / ms / 1e6
            rows.append(
                [dtype, name, f"{ms:.3f}", f"{nbytes / 2**20:.1f}", f"{rate:.0f}", f"{rate / copy:.0%}"]
            )
            if device.type == "cuda":
                top = kernel_ms(step, device, args.reps).most_common(4)
                kernels += [[dtype, name, k[:70], f"{t:.3f}"] for k, t in top]
    header = ["residual", "way", "forward + backward ms", "bytes moved at least (MiB)", "GB/s", "vs the copy"]
    body = (
        f"{args.tokens} rows of {args.dim}; a device-to-device copy moves {copy:.0f} GB/s (read + written)"
        "\n\n" + markdown_table(header, rows)
    )
    if kernels:
        body += "\n\nThe kernels of each row (the four longest), ms per call:\n\n" + markdown_table(
            ["residual", "way", "kernel", "ms"], kernels
        )
    print(body)
    write_result("norm_kernels", body)


if __name__ == "__main__":
    main()
