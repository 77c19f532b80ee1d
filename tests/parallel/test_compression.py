"""Payload codecs: stated error bounds, byte counts, error feedback, and PowerSGD over gloo."""

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_dsv3.parallel.compression import (
    BlockCodec,
    Fp8BlockCodec,
    Int8BlockCodec,
    PowerSGDCodec,
    TopKCodec,
    get_codec,
)

BLOCK_CODECS = [Fp8BlockCodec(), Int8BlockCodec()]
DTYPES = [torch.float32, torch.bfloat16]
F32_MAX = torch.finfo(torch.float32).max
BF16_MAX = torch.finfo(torch.bfloat16).max


def assert_within_bound(codec: BlockCodec, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round-trip x through encode/decode and pack/unpack; check the stated bound; return the decoded x."""
    decoded = codec.decode(codec.encode(x), dtype)
    assert decoded.dtype == dtype and decoded.shape == x.shape
    assert torch.isfinite(decoded).all()
    err = (x.double() - decoded.double()).abs()
    bound = codec.max_error(x, dtype).double()
    if x.numel():
        worst = (err - bound).argmax()
        x_worst, err_worst, bound_worst = x.flatten()[worst], err.flatten()[worst], bound.flatten()[worst]
        assert (err <= bound).all(), f"{codec.name}: error {err_worst} > bound {bound_worst} at x={x_worst}"
    torch.testing.assert_close(codec.unpack(codec.pack(x), x.shape, dtype), decoded, rtol=0, atol=0)
    return decoded


def block_amax(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """(..., dim) -> per-element amax of its block, (..., dim) float64."""
    dim = x.shape[-1]
    padded = torch.nn.functional.pad(x.double().abs(), (0, -dim % block))
    return padded.unflatten(-1, (-1, block)).amax(-1).repeat_interleave(block, -1)[..., :dim]


# Rows of 1-300 channels (partial blocks), any finite fp32 values: zeros, subnormals, values near the max,
# and, through hypothesis' fill value, long runs of one repeated value.
arrays = st.tuples(st.integers(1, 3), st.integers(1, 300)).flatmap(
    lambda shape: hnp.arrays(
        np.float32, shape, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
    )
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(array=arrays, codec=st.sampled_from(BLOCK_CODECS), dtype=st.sampled_from(DTYPES))
def test_round_trip_within_stated_bound(array: np.ndarray, codec: BlockCodec, dtype: torch.dtype) -> None:
    x = torch.from_numpy(array)
    if dtype == torch.bfloat16:
        x = x.clamp(-BF16_MAX, BF16_MAX).to(dtype)
    assert_within_bound(codec, x, dtype)


ADVERSARIAL = {
    "zeros": torch.zeros(3, 200),
    "huge": torch.full((2, 130), F32_MAX) * torch.tensor([1.0, -1.0]).repeat(65),
    "huge_random": torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 3e37,
    "tiny_normal": torch.randn(2, 140, generator=torch.Generator().manual_seed(1)) * 1e-37,
    "tiny_subnormal": torch.tensor([1e-45, 3e-45, 1e-42, 1e-40]).repeat(2, 40),
    "all_equal_rows": torch.arange(1.0, 5.0).unsqueeze(1).expand(4, 300) * 0.37,
    "spike_among_tiny": torch.cat([torch.tensor([[1e30]]), torch.full((1, 200), 1e-30)], dim=1),
    "one_channel": torch.tensor([[0.5], [-3.0], [0.0]]),
    "dim_127": torch.randn(5, 127, generator=torch.Generator().manual_seed(2)),
    "dim_129": torch.randn(5, 129, generator=torch.Generator().manual_seed(3)),
    "no_rows": torch.zeros(0, 129),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", BLOCK_CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_inputs(name: str, codec: BlockCodec, dtype: torch.dtype) -> None:
    x = ADVERSARIAL[name].clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    decoded = assert_within_bound(codec, x, dtype)
    # Decoded values never exceed their block's amax (the scale is rounded toward zero), and zeros stay zeros.
    assert (decoded.double().abs() <= block_amax(x)).all()
    assert (decoded[x == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_headline_bounds_hold_and_are_tight(dtype: torch.dtype) -> None:
    """fp8: |x - x^| <= amax_b * 2^-4 (in fact amax_b / 28); int8: amax_b / 254, reached up to a few %."""
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(4)).to(dtype)
    amax = block_amax(x)
    out_rounding = torch.finfo(dtype).eps / 2 * x.double().abs()
    for codec, headline in [(Fp8BlockCodec(), 1 / 28), (Int8BlockCodec(), 1 / 254)]:
        err = (x.double() - codec.decode(codec.encode(x), dtype).double()).abs()
        assert (err <= headline * amax * (1 + 1e-6) + out_rounding).all()
        assert (err / amax).max() > 0.8 * headline, "bound is loose: is the codec quantizing at all?"
    fp8_err = (x.double() - Fp8BlockCodec().decode(Fp8BlockCodec().encode(x), torch.float64)).abs()
    assert (fp8_err <= 2**-4 * amax).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("codec", BLOCK_CODECS, ids=lambda c: c.name)
def test_nonfinite_input_rejected_with_location(codec: BlockCodec, bad: float) -> None:
    x = torch.randn(4, 200)
    x[2, 150] = bad
    where = rf"{type(codec).__name__}\.encode: .*shape \(4, 200\)"
    with pytest.raises(ValueError, match=rf"{where} holds 1 non-finite .*{bad} at index \(2, 150\)"):
        codec.encode(x)
    with pytest.raises(ValueError, match="non-finite"):
        codec.pack(x.bfloat16())
    codec.encode(x, check_finite=False)  # the check is optional: no error, no host sync


@pytest.mark.parametrize("codec", BLOCK_CODECS, ids=lambda c: c.name)
def test_pack_rows_travel_independently(codec: BlockCodec) -> None:
    x = torch.randn(3, 5, 300, dtype=torch.bfloat16)
    buf = codec.pack(x)
    assert buf.dtype == torch.uint8 and buf.is_contiguous()
    assert buf.shape == (15, codec.bytes_per_row(300)) and buf.numel() == codec.nbytes(x.shape)
    assert codec.bytes_per_row(300) == 300 + 4 * 3
    full = codec.unpack(buf, x.shape, torch.bfloat16)
    torch.testing.assert_close(full, codec.decode(codec.encode(x), torch.bfloat16), rtol=0, atol=0)
    # An all-to-all hands a rank any subset of rows, in any order: each row decodes on its own.
    rows = torch.tensor([14, 0, 7])
    part = codec.unpack(buf[rows], (3, 300), torch.bfloat16)
    torch.testing.assert_close(part, full.reshape(15, 300)[rows], rtol=0, atol=0)


def test_unpack_rejects_a_buffer_of_the_wrong_shape() -> None:
    codec = Fp8BlockCodec()
    buf = codec.pack(torch.randn(4, 256))
    with pytest.raises(ValueError, match=r"expected a uint8 buffer of shape \(4, 264\)"):
        codec.unpack(buf[:, :-1], (4, 256), torch.float32)
    with pytest.raises(ValueError, match="uint8"):
        codec.unpack(buf.view(torch.int8), (4, 256), torch.float32)


def test_byte_counts_and_ratios() -> None:
    fp8, int8 = get_codec("fp8"), get_codec("int8")
    assert fp8.bytes_per_row(7168) == int8.bytes_per_row(7168) == 7168 + 56 * 4
    assert fp8.nbytes((2, 4096, 7168)) == 8192 * 7392
    assert fp8.compression_ratio(7168) == pytest.approx(2 * 7168 / 7392)
    assert fp8.compression_ratio(7168, torch.float32) == pytest.approx(4 * 7168 / 7392)
    assert Fp8BlockCodec(block_size=64).bytes_per_row(100) == 100 + 2 * 4


def test_get_codec() -> None:
    assert isinstance(get_codec("fp8"), Fp8BlockCodec)
    assert isinstance(get_codec("int8"), Int8BlockCodec)
    assert get_codec(None) is None
    with pytest.raises(ValueError, match=r"unknown payload codec 'fp4'; choose one of 'fp8', 'int8' or None"):
        get_codec("fp4")
    with pytest.raises(ValueError, match="block_size"):
        Fp8BlockCodec(block_size=0)


def test_topk_sends_the_largest_entries() -> None:
    codec = TopKCodec(ratio=0.1)
    x = torch.randn(20, 30)
    payload = codec.encode(x, "w")
    assert payload.values.numel() == payload.indices.numel() == 60 and payload.indices.dtype == torch.int32
    sent = codec.decode(payload)
    threshold = x.abs().flatten().kthvalue(600 - 60).values
    torch.testing.assert_close(sent, torch.where(x.abs() > threshold, x, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(sent + codec.residuals["w"].view(20, 30), x, rtol=0, atol=0)
    assert codec.nbytes(x.shape, torch.float32) == 60 * (4 + 4)
    assert codec.compression_ratio(x.shape, torch.bfloat16) == pytest.approx(1200 / 360)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_error_feedback_delays_but_never_loses(dtype: torch.dtype) -> None:
    """Sum of what was sent = sum of inputs - residual, and the residual stays within its stated bound."""
    codec, steps, numel = TopKCodec(ratio=0.05), 200, 1000
    generator = torch.Generator().manual_seed(5)
    mean = torch.randn(numel, generator=generator)  # a persistent direction, as gradients have
    contraction = math.sqrt(1 - codec.k(numel) / numel)
    sent_sum, input_sum, max_input_norm = torch.zeros(numel), torch.zeros(numel), 0.0
    for _ in range(steps):
        x = (mean + torch.randn(numel, generator=generator)).to(dtype)
        sent_sum += codec.decode(codec.encode(x, "grad")).float()
        input_sum += x.float()
        max_input_norm = max(max_input_norm, x.float().norm().item())
        residual = codec.residuals["grad"]
        assert residual.norm() <= contraction / (1 - contraction) * max_input_norm * (1 + 1e-5)
    torch.testing.assert_close(sent_sum + residual, input_sum, rtol=1e-5, atol=1e-3)
    # Averaged over the steps the sent gradient converges to the mean input, at rate ||residual|| / steps.
    assert (sent_sum - input_sum).norm() / steps < 0.1 * mean.norm()


def test_topk_rejects_nonfinite_and_name_reuse() -> None:
    codec = TopKCodec(ratio=0.5)
    with pytest.raises(ValueError, match=r"TopKCodec.encode\('g'\): .*nan at index \(1,\)"):
        codec.encode(torch.tensor([1.0, float("nan")]), "g")
    codec.encode(torch.ones(4), "g")
    with pytest.raises(ValueError, match="give each tensor its own name"):
        codec.encode(torch.ones(5), "g")
    with pytest.raises(ValueError, match="ratio"):
        TopKCodec(ratio=0.0)


def low_rank_plus_noise(n: int, m: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, rank, generator=generator) @ torch.randn(rank, m, generator=generator)
    return low_rank + noise * torch.randn(n, m, generator=generator)


def test_powersgd_error_feedback_drives_the_average_to_the_gradient() -> None:
    """On a fixed matrix, warm start converges to the best rank-r error; with error feedback the running
    average of what is sent goes on to converge to the matrix itself, beyond any rank-r approximation."""
    grad = low_rank_plus_noise(64, 48, rank=4, noise=0.05, seed=6)
    best_rank2 = torch.linalg.svdvals(grad)[2:].norm() / grad.norm()
    codec = PowerSGDCodec(rank=2)
    sent_sum, errors = torch.zeros_like(grad), []
    for step in range(1, 41):
        factors = codec.compress(grad, "w")
        assert factors.p.shape == (64, 2) and factors.q.shape == (48, 2)
        sent_sum += codec.decompress(factors)
        errors.append(((sent_sum / step - grad).norm() / grad.norm()).item())
    assert errors[0] >= best_rank2 * 0.99
    assert errors[9] < errors[0] / 2 and errors[-1] < errors[9] / 2
    assert errors[-1] < 0.1 * best_rank2
    torch.testing.assert_close(sent_sum + codec.state.error_dict["w"], 40 * grad, rtol=1e-4, atol=1e-3)

    without_feedback = PowerSGDCodec(rank=2, use_error_feedback=False)
    for _ in range(40):
        approx = without_feedback.decompress(without_feedback.compress(grad, "w"))
    assert (approx - grad).norm() / grad.norm() >= best_rank2 * 0.99  # stuck at the rank-2 truncation


@pytest.mark.parametrize("rank", [1, 4], ids=["gram_schmidt", "qr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_powersgd_zero_gradient_stays_zero(rank: int, dtype: torch.dtype) -> None:
    """An expert that received no tokens has an all-zero gradient: no NaN from orthogonalization."""
    codec = PowerSGDCodec(rank=rank)
    for _ in range(2):
        out = codec.decompress(codec.compress(torch.zeros(16, 8, 3, dtype=dtype), "expert"))
        assert out.shape == (16, 8, 3) and out.dtype == dtype and (out == 0).all()


def test_powersgd_byte_counts_and_validation() -> None:
    codec = PowerSGDCodec(rank=4)
    assert codec.nbytes((1024, 512), torch.bfloat16) == (1024 + 512) * 4 * 2
    assert codec.compression_ratio((1024, 512), torch.bfloat16) == pytest.approx(1024 * 512 / (1536 * 4))
    assert codec.nbytes((1024,), torch.float32) == 1024 * 4  # a vector is not worth compressing
    assert codec.nbytes((8, 4, 2), torch.float32) == 64 * 4  # nor a tiny matrix (8, 8)
    with pytest.raises(ValueError, match="rank"):
        PowerSGDCodec(rank=0)
    with pytest.raises(ValueError, match=r"PowerSGDCodec.compress\('w'\): .*inf"):
        codec.compress(torch.full((4, 4), float("inf")), "w")
    codec.compress(torch.ones(8, 8), "w")
    with pytest.raises(ValueError, match="give each tensor its own name"):
        codec.compress(torch.ones(8, 4), "w")


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        codec = PowerSGDCodec(rank=2, start_iter=1)
        results = {}
        # Warm-up step: a plain mean all-reduce, exact.
        results["warmup"] = codec.allreduce(torch.full((32, 24), float(rank)), name="w")
        codec.step()
        shared = low_rank_plus_noise(32, 24, rank=2, noise=0.0, seed=100)  # the same on both ranks
        grads, outs = [], []
        for step in range(5):
            noise = torch.randn(32, 24, generator=torch.Generator().manual_seed(10 * rank + step))
            grad = shared + 0.05 * noise
            grads.append(grad)
            outs.append(codec.allreduce(grad, name="w"))
            codec.step()
        results["grads"], results["outs"] = torch.stack(grads), torch.stack(outs)
        results["bias"] = codec.allreduce(torch.arange(6.0) * (rank + 1), name="bias")
        results["zeros"] = codec.allreduce(torch.zeros(32, 24), name="zeros")
        results["stats"] = codec.state.compression_stats()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_powersgd_allreduce_over_gloo(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ["warmup", "outs", "bias", "zeros"]:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=f"ranks disagree on {key}")
    assert (r0["warmup"] == 0.5).all()
    torch.testing.assert_close(r0["bias"], torch.arange(6.0) * 1.5)
    assert (r0["zeros"] == 0).all()
    mean = (r0["grads"] + r1["grads"]) / 2  # (steps, 32, 24)
    relative = ((r0["outs"] - mean).flatten(1).norm(dim=1) / mean.flatten(1).norm(dim=1)).tolist()
    assert max(relative) < 0.1, relative
    # Error feedback: summed over the steps, what was sent falls short of the summed means by less than a
    # single step's error.
    assert (r0["outs"].sum(0) - mean.sum(0)).norm() < (r0["outs"][0] - mean[0]).norm()
    # Counted once compression started: five steps of "w", the bias (sent whole), the zeros.
    _, numel_before, numel_after = r0["stats"]
    assert (numel_before, numel_after) == (6 * 32 * 24 + 6, 6 * (32 + 24) * 2 + 6)
