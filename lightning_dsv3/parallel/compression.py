"""Payload codecs: shrink what expert-parallel all-to-all and data-parallel gradient reductions send.

Two families:

* Activation codecs for dispatch, chosen by `get_codec` (`Fp8BlockCodec`, `Int8BlockCodec`): stateless,
  one fp32 scale per block of 128 consecutive channels along the last dim, as DeepSeek-V3 quantizes its
  dispatch activations (1x128 tiles, scale = amax / qmax). `pack` writes the codes and the scales of each
  row into one uint8 row, so a single `all_to_all_single` with row splits carries both; `bytes_per_row`
  gives the unit of those splits without encoding anything.
* Gradient codecs (`TopKCodec`, `PowerSGDCodec`): biased, so they keep error feedback, a residual per
  tensor keyed by a name: what one step does not send is added to the next step's input, so it is delayed,
  never lost. Each has an `allreduce` (the group mean through the codec: top-k as one all_gather of values
  and indices, PowerSGD as its two all-reduces, `allreduce_many` batching every P and every Q of several
  tensors into one each, as torch's hook batches a bucket) that takes the collective as an optional
  callable, so the strategy can record it.

Error bounds of the block codecs, per element x of a block b with amax_b = max |x| over b and fp32 scale
s_b <= amax_b / qmax (the scale is rounded toward zero, so a decoded value never exceeds amax_b and never
overflows, even for blocks near the dtype's largest finite value):

* fp8 e4m3 (qmax 448): |x - x^| <= min(2^-4 |x| + 2^-10 s_b, 16 s_b), hence |x - x^| <= amax_b / 28,
  below amax_b * 2^-4. e4m3 has 3 mantissa bits: rounding a normal code y (|y| >= 2^-6) moves it by at
  most half a unit in the last place, 2^-4 |y|; codes below 2^-6 are subnormal, spaced 2^-9, so they move
  by at most 2^-10 (the subnormal floor, in units of s_b); the widest gap between codes, 32 between 256
  and 448, bounds every move by 16.
* int8 (qmax 127): |x - x^| <= s_b / 2 <= amax_b / 254.

Both hold up to fp32 arithmetic, at most 2^-21 amax_b + 2^-139 in all: rounding of the scale, of x / s_b
and of the decoded product, scales in fp32's subnormal range for blocks of tiny values, and blocks with
amax_b below qmax * 2^-149, whose scale is 0 and which decode to 0. Decoding to bf16 or fp16 adds that
dtype's rounding. `BlockCodec.max_error` computes the whole bound per element.

On CUDA with Triton installed, `pack` and `unpack` run fused kernels (`codec_kernels`) that give the same
bytes in one pass over the payload. Encode and decode are vectorised and never synchronise with the device,
except the NaN/Inf check
(`check_finite=True`, the default), which reads a flag on the host; pass `check_finite=False` on GPU hot
paths once the inputs are known to be finite. A NaN or Inf would otherwise spread silently: through the
amax to the whole block, or into an error-feedback residual for good. All codecs work on detached tensors:
codes carry no autograd history, and the `torch.autograd.Function` that wraps the communication defines the
backward (quantization passed straight through).
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import (
    PowerSGDState,
    _orthogonalize,
    _should_compress,
)

from lightning_dsv3.parallel import codec_kernels

__all__ = [
    "BlockCodec",
    "BlockPayload",
    "Fp8BlockCodec",
    "Int8BlockCodec",
    "LowRankFactors",
    "PowerSGDCodec",
    "TopKCodec",
    "TopKPayload",
    "get_codec",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_input(x: Tensor, where: str, check_finite: bool) -> None:
    """Reject what no codec can encode; with `check_finite`, NaN/Inf too (a host sync)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{where}: expected a float32, bfloat16 or float16 tensor, got {x.dtype}; cast first"
        )
    if x.ndim == 0:
        raise ValueError(f"{where}: expected a tensor with at least one dim, got a scalar; reshape to (1,)")
    if check_finite:
        nonfinite = ~torch.isfinite(x)
        if nonfinite.any():
            index = tuple(nonfinite.nonzero()[0].tolist())
            raise ValueError(
                f"{where}: the input of shape {tuple(x.shape)} holds {int(nonfinite.sum())} non-finite "
                f"value(s) (NaN or Inf); the first is {x[index].item()} at index {index}. It would poison "
                "the scale of its whole block or an error-feedback residual, so it is rejected; look for an "
                "overflow upstream (check_finite=False skips this check, which synchronises with the device)"
            )


@dataclass(frozen=True)
class BlockPayload:
    """What a block codec sends for x (..., dim): codes and one scale per block, both plain tensors.

    data: (..., dim) one byte per element: uint8 bit patterns of float8_e4m3fn (collectives move uint8 on
        every backend) or int8.
    scales: (..., n_blocks) float32, n_blocks = ceil(dim / block_size).
    """

    data: Tensor
    scales: Tensor


@dataclass(frozen=True)
class BlockCodec(ABC):
    """Per-block scaled quantization of the last dim; subclasses fix the code format.

    A final partial block (dim not a multiple of `block_size`) is zero-padded internally: zeros never raise
    its amax, and the padding is neither stored nor sent.
    """

    block_size: int = 128

    name: ClassVar[str]
    qmax: ClassVar[float]  # largest code magnitude: scale = amax / qmax
    value_dtype: ClassVar[torch.dtype]  # the codes' numeric format
    code_dtype: ClassVar[torch.dtype]  # how `BlockPayload.data` holds them

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(
                f"{type(self).__name__}: block_size must be an int >= 1, got {self.block_size!r}"
            )

    def n_blocks(self, dim: int) -> int:
        """Number of scales per row of `dim` channels."""
        return -(-dim // self.block_size)

    def bytes_per_row(self, dim: int) -> int:
        """Bytes one packed row of `dim` channels takes: dim codes plus n_blocks fp32 scales."""
        return dim + 4 * self.n_blocks(dim)

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes `pack` produces for an input of `shape` (..., dim)."""
        return math.prod(shape[:-1]) * self.bytes_per_row(shape[-1])

    def compression_ratio(self, dim: int, dtype: torch.dtype = torch.bfloat16) -> float:
        """Bytes of a row in `dtype` over bytes of its packed row (about 1.94 against bf16 at dim 7168)."""
        return dim * dtype.itemsize / self.bytes_per_row(dim)

    def encode(self, x: Tensor, check_finite: bool = True) -> BlockPayload:
        """Quantize x (..., dim) to codes (..., dim) and scales (..., n_blocks), both contiguous.

        check_finite: raise ValueError naming the first NaN/Inf; this synchronises with the device.
        """
        values, scales = self._scale(x, f"{type(self).__name__}.encode", check_finite)
        return BlockPayload(data=values.to(self.value_dtype).view(self.code_dtype), scales=scales)

    def decode(self, payload: BlockPayload, dtype: torch.dtype) -> Tensor:
        """Codes (..., dim) and scales (..., n_blocks) back to values (..., dim) in `dtype`."""
        dim = payload.data.shape[-1]
        if payload.scales.shape[-1] != self.n_blocks(dim):
            raise ValueError(
                f"{type(self).__name__}.decode: {dim} channels need {self.n_blocks(dim)} scales per row "
                f"(block_size {self.block_size}), got {payload.scales.shape[-1]}; was it encoded with "
                "another block_size?"
            )
        values = self._blocks(payload.data.view(self.value_dtype))  # (..., n_blocks, block_size) fp32
        return (values * payload.scales.unsqueeze(-1)).flatten(-2)[..., :dim].to(dtype)

    def pack(self, x: Tensor, check_finite: bool = True) -> Tensor:
        """Encode x (..., dim) into one uint8 buffer (rows, bytes_per_row(dim)), rows = numel // dim.

        A row is [dim codes | n_blocks fp32 scales as bytes], self-contained, so all_to_all_single with
        row splits sends codes and scales together and any row can go to any rank.
        """
        if codec_kernels.available(x, self.block_size):
            _check_input(x.detach(), f"{type(self).__name__}.pack", check_finite)
            return codec_kernels.pack(x.detach(), self.block_size, self.qmax, self._is_fp8)
        values, scales = self._scale(x, f"{type(self).__name__}.pack", check_finite)
        rows, dim = math.prod(x.shape[:-1]), x.shape[-1]
        buf = torch.empty(rows, self.bytes_per_row(dim), dtype=torch.uint8, device=x.device)
        buf[:, :dim].view(self.value_dtype).copy_(values.reshape(rows, dim))  # converts as it writes
        buf[:, dim:] = scales.reshape(rows, self.n_blocks(dim)).view(torch.uint8)
        return buf

    def unpack(self, buf: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """Decode a `pack` buffer (rows, bytes_per_row(dim)) uint8 to `shape` (..., dim) in `dtype`."""
        shape = torch.Size(shape)
        dim = shape[-1]
        expected = (math.prod(shape[:-1]), self.bytes_per_row(dim))
        if buf.dtype != torch.uint8 or tuple(buf.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}.unpack: for shape {tuple(shape)} expected a uint8 buffer of shape "
                f"{expected} (rows, bytes_per_row({dim})), got {buf.dtype} of shape {tuple(buf.shape)}"
            )
        if codec_kernels.available(buf, self.block_size):
            return codec_kernels.unpack(buf, dim, self.block_size, dtype, self._is_fp8).reshape(shape)
        codes = buf[:, :dim].view(self.code_dtype)
        # The scales start at byte dim of each row, not necessarily 4-aligned: copy, then view as fp32.
        scales = buf[:, dim:].clone(memory_format=torch.contiguous_format).view(torch.float32)
        return self.decode(BlockPayload(data=codes, scales=scales), dtype).reshape(shape)

    @property
    def _is_fp8(self) -> bool:
        return self.value_dtype == torch.float8_e4m3fn

    def max_error(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The stated bound on |x - decode(encode(x), dtype)| per element, (..., dim) float32.

        The module docstring derives it; `dtype` (default x.dtype) adds the rounding of the decoded output.
        """
        x = x.detach()
        dim = x.shape[-1]
        amax = self._blocks(x).abs().amax(dim=-1).repeat_interleave(self.block_size, dim=-1)[..., :dim]
        abs_x = x.abs().float()
        err = self._rounding_error(abs_x, amax) + 2**-21 * amax + 2**-139
        out = torch.finfo(dtype or x.dtype)
        return err + out.eps / 2 * (abs_x + err) + out.smallest_normal * out.eps / 2

    def _scale(self, x: Tensor, where: str, check_finite: bool) -> tuple[Tensor, Tensor]:
        """x (..., dim) -> values (..., dim) fp32 in [-qmax, qmax], ready to cast to `value_dtype`, and
        scales (..., n_blocks) fp32."""
        x = x.detach()
        _check_input(x, where, check_finite)
        blocks = self._blocks(x)  # (..., n_blocks, block_size) fp32
        amax = blocks.abs().amax(dim=-1)  # (..., n_blocks)
        # Rounded toward zero, so qmax * scale <= amax after rounding: decoded values stay within the block's
        # amax, and blocks near the dtype's largest value do not decode to Inf. qmax is a tensor because CUDA
        # divides by a Python scalar through its reciprocal, which can round up by two ulps and would make
        # the codes differ between devices.
        scales = torch.nextafter(amax / amax.new_full((), self.qmax), amax.new_zeros(()))
        # A zero scale (all-zero block, or amax < qmax * 2^-149) divides by 1: its codes round to 0.
        values = blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(-1)
        values = self._round(values.clamp_(-self.qmax, self.qmax)).flatten(-2)[..., : x.shape[-1]]
        return values, scales

    def _blocks(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., n_blocks, block_size) float32, the last block zero-padded."""
        dim = x.shape[-1]
        n_blocks = self.n_blocks(dim)
        x = x.float()
        if n_blocks * self.block_size != dim:
            x = F.pad(x, (0, n_blocks * self.block_size - dim))
        return x.unflatten(-1, (n_blocks, self.block_size))

    @abstractmethod
    def _round(self, values: Tensor) -> Tensor:
        """Whatever rounding the cast to `value_dtype` does not do itself."""

    @abstractmethod
    def _rounding_error(self, abs_x: Tensor, amax: Tensor) -> Tensor:
        """Bound on the code rounding, in units of x, given |x| and its block's amax (both per element)."""


@dataclass(frozen=True)
class Fp8BlockCodec(BlockCodec):
    """float8_e4m3fn codes, scale = amax / 448 per block: |x - x^| <= amax_b / 28 (< amax_b * 2^-4).

    Per element also |x - x^| <= 2^-4 |x| + 2^-10 amax_b / 448 (relative in e4m3's normal range, the
    subnormal floor below it), up to fp32 arithmetic; see the module docstring. Codes travel as uint8 bit
    patterns, which every collective backend moves.
    """

    name: ClassVar[str] = "fp8"
    qmax: ClassVar[float] = 448.0
    value_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    code_dtype: ClassVar[torch.dtype] = torch.uint8

    def _round(self, values: Tensor) -> Tensor:
        return values  # the cast rounds to nearest even

    def _rounding_error(self, abs_x: Tensor, amax: Tensor) -> Tensor:
        return torch.minimum(2**-4 * abs_x + 2**-10 * amax / self.qmax, 16 * amax / self.qmax)


@dataclass(frozen=True)
class Int8BlockCodec(BlockCodec):
    """Symmetric int8 codes, scale = amax / 127 per block: |x - x^| <= amax_b / 254, up to fp32 arithmetic."""

    name: ClassVar[str] = "int8"
    qmax: ClassVar[float] = 127.0
    value_dtype: ClassVar[torch.dtype] = torch.int8
    code_dtype: ClassVar[torch.dtype] = torch.int8

    def _round(self, values: Tensor) -> Tensor:
        return values.round()  # the cast to int8 would truncate

    def _rounding_error(self, abs_x: Tensor, amax: Tensor) -> Tensor:
        return amax / (2 * self.qmax)


_BLOCK_CODECS: dict[str, type[BlockCodec]] = {"fp8": Fp8BlockCodec, "int8": Int8BlockCodec}


def get_codec(name: str | None) -> BlockCodec | None:
    """The dispatch payload codec called `name` ("fp8", "int8"), or None (send uncompressed) for None."""
    if name is None:
        return None
    if name not in _BLOCK_CODECS:
        raise ValueError(
            f"unknown payload codec {name!r}; choose one of {', '.join(map(repr, _BLOCK_CODECS))} "
            "or None for no compression"
        )
    return _BLOCK_CODECS[name]()


@dataclass(frozen=True)
class TopKPayload:
    """The k entries a `TopKCodec` sends for a tensor of `shape`.

    values: (k,) the input's dtype.
    indices: (k,) positions in the flattened tensor, int32 (int64 past 2^31 - 1 elements).
    """

    values: Tensor
    indices: Tensor
    shape: torch.Size


class TopKCodec:
    """Sparsify gradients to their k = round(ratio * numel) largest-magnitude entries, with error feedback.

    Each `encode(tensor, name)` selects from tensor + residuals[name] and keeps what it did not send (and the
    rounding of what it sent to the input dtype) as the new residual, so over T steps the sum of what was
    sent equals the sum of the inputs minus one residual. Top-k keeps at least the fraction k / numel of the
    energy, so the residual stays bounded: ||r|| <= c / (1 - c) * max_t ||x_t|| with c = sqrt(1 - k / numel).
    Residuals are float32, so small leftovers of bf16 gradients accumulate instead of rounding away;
    `residuals` is plain state to checkpoint.

    start_iter: like PowerSGD's, reduce uncompressed until `step()` has been called this many times (the
    early steps, where gradients change fastest, are where delaying entries costs most); `started` says
    whether that warm-up is over. The codec itself does not look at it: the caller routes the reduction.
    """

    def __init__(self, ratio: float = 0.01, start_iter: int = 0) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"TopKCodec: ratio must be in (0, 1], got {ratio}; 0.01 keeps 1% of the entries")
        if start_iter < 0:
            raise ValueError(f"TopKCodec: start_iter must be >= 0, got {start_iter}")
        self.ratio = ratio
        self.start_iter = start_iter
        self.iter = 0
        self.residuals: dict[str, Tensor] = {}

    def step(self) -> None:
        """Count one optimizer step, for `start_iter`."""
        self.iter += 1

    @property
    def started(self) -> bool:
        return self.iter >= self.start_iter

    def k(self, numel: int) -> int:
        """Entries sent for a tensor of `numel` elements (at least one, unless it is empty)."""
        return min(numel, max(1, round(self.ratio * numel)))

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes sent for a tensor of `shape` and `dtype`: k * (value bytes + index bytes)."""
        numel = math.prod(shape)
        return self.k(numel) * (dtype.itemsize + _index_dtype(numel).itemsize)

    def compression_ratio(self, shape: Sequence[int], dtype: torch.dtype) -> float:
        """Dense bytes over sent bytes."""
        return math.prod(shape) * dtype.itemsize / self.nbytes(shape, dtype)

    def encode(self, tensor: Tensor, name: str, check_finite: bool = True) -> TopKPayload:
        """Pick the k largest entries of tensor (any shape) + residuals[name]; the rest becomes the residual.

        check_finite: raise ValueError naming the first NaN/Inf (a NaN would stay in the residual for good);
            this synchronises with the device.
        """
        tensor = tensor.detach()
        _check_input(tensor, f"TopKCodec.encode({name!r})", check_finite)
        acc = tensor.flatten().to(torch.float32, copy=True)  # (numel,)
        residual = self.residuals.get(name)
        if residual is not None:
            if residual.shape != acc.shape:
                raise ValueError(
                    f"TopKCodec.encode: name {name!r} holds a residual of {residual.numel()} elements but "
                    f"the tensor has {acc.numel()}; give each tensor its own name"
                )
            acc += residual
        indices = acc.abs().topk(self.k(acc.numel()), sorted=False).indices
        values = acc[indices].to(tensor.dtype)
        acc[indices] -= values.float()  # what was sent leaves the residual, its rounding stays
        self.residuals[name] = acc
        return TopKPayload(values=values, indices=indices.to(_index_dtype(acc.numel())), shape=tensor.shape)

    def decode(self, payload: TopKPayload) -> Tensor:
        """The dense tensor of `payload.shape`, zero where nothing was sent."""
        dense = payload.values.new_zeros(payload.shape.numel())
        dense[payload.indices.long()] = payload.values
        return dense.view(payload.shape)

    def allreduce(
        self,
        tensor: Tensor,
        group: dist.ProcessGroup | None = None,
        *,
        name: str,
        check_finite: bool = True,
        all_gather: Callable[[Tensor, Tensor], object] | None = None,
    ) -> Tensor:
        """The mean over `group` of every rank's top-k of tensor + its residual (error feedback).

        Each rank's k values and indices travel as one uint8 buffer through one all_gather (top-k sets
        differ between ranks, so a sparse sum has no all-reduce), then every rank adds the `world` sparse
        tensors in rank order, in float32: the same bits everywhere, so replicas stay identical. Bytes
        sent per rank: `nbytes`. Returns a new tensor of tensor's shape and dtype.
        all_gather: (output, input) -> None, default `dist.all_gather_into_tensor` over `group`.
        """
        world = dist.get_world_size(group)
        payload = self.encode(tensor, name, check_finite)
        values, indices = payload.values, payload.indices
        packed = torch.cat([values.view(torch.uint8), indices.view(torch.uint8)])
        gathered = packed.new_empty(world * packed.numel())
        if all_gather is None:
            dist.all_gather_into_tensor(gathered, packed, group=group)
        else:
            all_gather(gathered, packed)
        gathered = gathered.view(world, -1)
        split = values.numel() * values.element_size()
        all_values = gathered[:, :split].contiguous().view(values.dtype).float()  # (world, k)
        all_indices = gathered[:, split:].contiguous().view(indices.dtype).long()
        dense = torch.zeros(tensor.numel(), dtype=torch.float32, device=tensor.device)
        for r in range(world):  # indices are unique within a rank: each add is exact and ordered
            dense[all_indices[r]] += all_values[r]
        return dense.div_(world).to(tensor.dtype).view(tensor.shape)


def _reduced(tensors: list[Tensor], reduce_sum: Callable[[Tensor], object]) -> list[Tensor]:
    """Sum `tensors` over the group with one collective on their concatenation; returns views of it."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    reduce_sum(flat)
    return [chunk.view(t.shape) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


@dataclass(frozen=True)
class LowRankFactors:
    """A rank-r gradient approximation P Q^T.

    p: (n, r) orthonormal columns. q: (m, r). shape: the gradient's shape; its matrix view is
    (n, m) = (shape[0], numel // shape[0]).
    """

    p: Tensor
    q: Tensor
    shape: torch.Size


class PowerSGDCodec:
    """PowerSGD (Vogels et al., 2019) low-rank gradient compression with error feedback and warm start.

    Reuses torch's DDP hook (torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook): its `PowerSGDState`
    holds the hyperparameters, the per-tensor error and Q memories (keyed here by name, there by bucket
    index), the RNG that seeds the initial Q identically on every rank, the iteration counter and the
    compression statistics; it pickles without its process group, as under DDP (unpickling needs the default
    process group initialised). Its `_orthogonalize` (Gram-Schmidt for rank <= 2 and half precision, QR
    otherwise) and `_should_compress` are called as they are. The hook itself cannot be reused: it only takes
    a DDP GradBucket (a flat buffer of several parameters that DDP fills), while expert and dense gradients
    here are reduced per tensor over different groups (dp for routed experts, dp x ep for dense weights),
    which is why the group is an argument of `allreduce` rather than part of the state. This class is the
    hook's per-tensor path (steps 3.1-3.7 of its docstring) written for one tensor, with one change: the
    initial Q is drawn on the gradient's device, where the hook copies a CPU draw (a host sync on GPU).

    A gradient of shape (n, ...) is viewed as the matrix (n, m), m = numel // n, like the hook does.
    """

    def __init__(
        self,
        rank: int = 1,
        *,
        start_iter: int = 0,
        min_compression_rate: float = 2.0,
        use_error_feedback: bool = True,
        warm_start: bool = True,
        orthogonalization_epsilon: float | None = None,
        random_seed: int = 0,
    ) -> None:
        """
        rank: the approximation rank r (1-4 is typical; it is capped at min(n, m) per tensor).
        start_iter: plain all-reduce until `step()` has been called this many times (PowerSGD's advice:
            about 10% of training, at least the LR warm-up).
        min_compression_rate: compress a tensor only if n * m > min_compression_rate * (n + m) * r.
        orthogonalization_epsilon: added to column norms in Gram-Schmidt. None, the default, uses the
            smallest normal number of the gradient's dtype: an all-zero gradient (an expert that received no
            tokens) then compresses to zeros instead of NaN, and nonzero columns are not measurably biased.
        random_seed: seeds the initial Q; use the same on every rank.
        """
        if rank < 1:
            raise ValueError(f"PowerSGDCodec: rank must be >= 1, got {rank}")
        if start_iter < 0:
            raise ValueError(f"PowerSGDCodec: start_iter must be >= 0, got {start_iter}")
        self.state = PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            # PowerSGDState demands start_powerSGD_iter > 1 with error feedback or warm start because DDP
            # rebuilds its buckets after iteration 1; tensors keyed by name never move, so any start works.
            start_powerSGD_iter=2,
            min_compression_rate=min_compression_rate,
            use_error_feedback=use_error_feedback,
            warm_start=warm_start,
            orthogonalization_epsilon=orthogonalization_epsilon,
            random_seed=random_seed,
        )
        self.state.start_powerSGD_iter = start_iter

    def step(self) -> None:
        """Count one optimizer step (what the DDP hook does after the last bucket), for `start_iter`."""
        self.state.iter += 1

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes `allreduce` puts into all-reduces for a tensor of `shape` once compression has started.

        P and Q, (n + m) * r elements, if the tensor is worth compressing, else all n * m elements.
        """
        n, m = self._matrix_shape(shape)
        compress, numel, numel_compressed = _should_compress(
            n, m, self._rank(n, m), self.state.min_compression_rate
        )
        return (numel_compressed if compress else numel) * dtype.itemsize

    def compression_ratio(self, shape: Sequence[int], dtype: torch.dtype) -> float:
        """Dense bytes over the bytes `allreduce` sends."""
        return math.prod(shape) * dtype.itemsize / self.nbytes(shape, dtype)

    @property
    def started(self) -> bool:
        """Whether `start_iter` steps have passed (compression is on for tensors worth it)."""
        return self.state.iter >= self.state.start_powerSGD_iter

    def will_compress(self, shape: Sequence[int]) -> bool:
        """Whether `allreduce` compresses a tensor of `shape` now (past `start_iter`, and worth it)."""
        if not self.started:
            return False
        n, m = self._matrix_shape(shape)
        return _should_compress(n, m, self._rank(n, m), self.state.min_compression_rate)[0]

    def compress(self, tensor: Tensor, name: str, check_finite: bool = True) -> LowRankFactors:
        """One local power iteration on tensor (n, ...) + its error: rank-r factors, no communication.

        Always factorizes (the when-to-compress policy, `start_iter` and `min_compression_rate`, belongs to
        `allreduce`, the path that sends bytes), and updates the error and warm-start state of `name`.
        check_finite: raise ValueError naming the first NaN/Inf; this synchronises with the device.
        """
        tensor = tensor.detach()
        _check_input(tensor, f"PowerSGDCodec.compress({name!r})", check_finite)
        ((p, q),) = self._power_iteration(
            [self._matrix(tensor)], [name], reduce_sum=lambda t: None, world_size=1
        )
        return LowRankFactors(p=p, q=q, shape=tensor.shape)

    def decompress(self, factors: LowRankFactors) -> Tensor:
        """P Q^T in the gradient's shape."""
        return (factors.p @ factors.q.T).view(factors.shape)

    def allreduce(
        self,
        tensor: Tensor,
        group: dist.ProcessGroup | None = None,
        *,
        name: str,
        check_finite: bool = True,
        all_reduce: Callable[[Tensor], object] | None = None,
    ) -> Tensor:
        """The mean of tensor (n, ...) over `group` (default: world), low-rank compressed.

        As the hook: add the error of `name`, P = M Q, all-reduce P, orthogonalize it, Q = M^T P, all-reduce
        Q and divide by the world size, return P Q^T (identical on every rank) and keep M - P Q^T as the
        error. Before `start_iter` steps, and for tensors not worth compressing (biases, norms), it is a
        plain mean all-reduce. Returns a new tensor of tensor's shape and dtype; the input is not modified.
        Every rank must call it for the same names in the same order (the shared RNG seeds Q).
        check_finite: raise ValueError naming the first NaN/Inf; this synchronises with the device.
        all_reduce: in-place sum over the group, default `dist.all_reduce` over `group` (the strategy
            passes one that records telemetry).
        """
        tensor = tensor.detach()
        _check_input(tensor, f"PowerSGDCodec.allreduce({name!r})", check_finite)
        if all_reduce is None:
            all_reduce = lambda t: dist.all_reduce(t, group=group)
        world_size = dist.get_world_size(group)
        if not self.will_compress(tensor.shape):
            if self.state.iter >= self.state.start_powerSGD_iter:
                self._count(tensor.shape, compressed=False)
            out = tensor.clone()
            all_reduce(out)
            return out.div_(world_size)
        return self.allreduce_many([tensor], group, names=[name], check_finite=False, all_reduce=all_reduce)[
            0
        ]

    def allreduce_many(
        self,
        tensors: Sequence[Tensor],
        group: dist.ProcessGroup | None = None,
        *,
        names: Sequence[str],
        check_finite: bool = True,
        all_reduce: Callable[[Tensor], object] | None = None,
    ) -> list[Tensor]:
        """`allreduce` of several tensors, all compressed whatever `will_compress` says, with the hook's
        batching: every P goes in one all-reduce and every Q in another (two collectives in all).

        Callers route the tensors not worth compressing through a plain all-reduce (see `will_compress`).
        """
        for t, n in zip(tensors, names, strict=True):
            _check_input(t, f"PowerSGDCodec.allreduce_many({n!r})", check_finite)
            self._count(t.shape, compressed=True)
        if all_reduce is None:
            all_reduce = lambda t: dist.all_reduce(t, group=group)
        factors = self._power_iteration(
            [self._matrix(t.detach()) for t in tensors], names, all_reduce, dist.get_world_size(group)
        )
        return [(p @ q.T).view(t.shape) for t, (p, q) in zip(tensors, factors)]

    def _count(self, shape: Sequence[int], compressed: bool) -> None:
        """The hook's compression statistics (`PowerSGDState.compression_stats`)."""
        n, m = self._matrix_shape(shape)
        numel = n * m
        self.state.total_numel_before_compression += numel
        self.state.total_numel_after_compression += (n + m) * self._rank(n, m) if compressed else numel

    def _power_iteration(
        self,
        matrices: list[Tensor],
        names: Sequence[str],
        reduce_sum: Callable[[Tensor], object],
        world_size: int,
    ) -> list[tuple[Tensor, Tensor]]:
        """One PowerSGD step on matrices (n_i, m_i) with error feedback -> P_i (n_i, r_i), Q_i (m_i, r_i).

        `reduce_sum` runs twice, on every P and then on every Q flattened into one buffer each.
        """
        state = self.state
        inputs, qs = [], []
        for matrix, name in zip(matrices, names):
            n, m = matrix.shape
            rank = self._rank(n, m)
            if state.use_error_feedback and name in state.error_dict:
                error = state.error_dict[name]
                if error.shape != matrix.shape:
                    raise ValueError(
                        f"PowerSGDCodec: name {name!r} holds an error of shape {tuple(error.shape)} but the "
                        f"gradient's matrix view is {(n, m)}; give each tensor its own name"
                    )
                matrix = matrix + error
            q = state.q_memory_dict.get(name) if state.warm_start else None
            if q is None or q.shape != (1, m, rank):
                # The state's RNG advances alike on every rank, so the initial Q agrees without communication.
                generator = torch.Generator(matrix.device).manual_seed(int(state.rng.randint(1_000_000_000)))
                q = torch.randn(1, m, rank, generator=generator, device=matrix.device, dtype=matrix.dtype)
            _orthogonalize(q, self._epsilon(matrix))
            inputs.append(matrix)
            qs.append(q)
        ps = _reduced([torch.bmm(mat.unsqueeze(0), q) for mat, q in zip(inputs, qs)], reduce_sum)  # (1, n, r)
        for p, mat in zip(ps, inputs):  # no division by the world size: P is orthonormalized
            _orthogonalize(p, self._epsilon(mat))
        qs = _reduced(
            [torch.bmm(mat.T.unsqueeze(0), p) for mat, p in zip(inputs, ps)], reduce_sum
        )  # (1, m, r)
        out = []
        for matrix, name, p, q in zip(inputs, names, ps, qs):
            q.div_(world_size)
            if state.warm_start:
                state.q_memory_dict[name] = q
            if state.use_error_feedback:
                state.error_dict[name] = matrix - p[0] @ q[0].T
            out.append((p[0], q[0]))
        return out

    def _epsilon(self, matrix: Tensor) -> float:
        eps = self.state.orthogonalization_epsilon
        return torch.finfo(matrix.dtype).smallest_normal if eps is None else eps

    def _rank(self, n: int, m: int) -> int:
        return min(n, m, self.state.matrix_approximation_rank)

    @staticmethod
    def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
        n = shape[0]
        return n, math.prod(shape) // n if n else 0

    def _matrix(self, tensor: Tensor) -> Tensor:
        return tensor.reshape(self._matrix_shape(tensor.shape))
