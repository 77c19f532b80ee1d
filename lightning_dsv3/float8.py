"""FP8 training of the model's linear layers through torchao (`DeepSeekV3Module(float8=...)`).

A converter applied to a built model, before `torch.compile`, as torchtitan's `float8` converter is:
every eligible `nn.Linear` becomes torchao's `Float8Linear`, which casts its input, weight and
output gradient to float8_e4m3fn with dynamic scales and runs the three GEMMs of a linear layer
(forward, input gradient, weight gradient) as `torch._scaled_mm`. Weights, gradients and optimizer
state stay in their own precision, and parameter names do not change, so checkpoints load both ways.

Recipes (torchao's `Float8LinearRecipeName`):
  tensorwise  one scale per tensor, cuBLAS kernels; torchao's fastest recipe
  rowwise     one scale per row, power-of-two scales, CUTLASS kernels; finer scales, slower

What stays in its own precision, and why (DeepSeek-V3 report, 3.3.1, keeps the same modules out):
  head             the output head feeds softmax cross-entropy over the vocabulary, where fp8's
                   3 mantissa bits show up directly in the loss
  embedding        a table lookup, not a GEMM: nothing to gain
  router gate      `Router.weight`, applied in fp32 on purpose: expert choice flips on small score
                   differences, and its GEMM (n_routed_experts outputs) is too small to gain
  tiny projections any linear whose in or out features are not a multiple of 16 (fp8 GEMM kernels
                   need both to be), e.g. MLA's `wkv_a` (kv_lora_rank + qk_rope_head_dim = 24 outputs
                   in the debug preset)
  routed experts   `GroupedExperts` stays bf16 (see `convert_to_float8`)
"""

from __future__ import annotations

import re

import torch
from torch import nn

FLOAT8_RECIPES: tuple[str, ...] = ("tensorwise", "rowwise")
TORCHAO_MIN_VERSION = (0, 18)
FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada (8.9), Hopper (9.0), Blackwell (10.x): fp8 tensor cores
_INSTALL = "pip install 'lightning-dsv3[fp8]' (or pip install 'torchao>=0.18')"


def check_float8(recipe: str | None) -> None:
    """Raise unless `recipe` is None (off) or a recipe torchao can run here: ValueError for an unknown
    recipe, ImportError when torchao is missing or older than 0.18 (naming what to install)."""
    if recipe is None:
        return
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(
            f"float8={recipe!r} is not a recipe; choose 'tensorwise' (fastest), 'rowwise' (finer scales) "
            "or None (no fp8)"
        )
    try:
        import torchao
    except ImportError as err:
        raise ImportError(
            f"float8={recipe!r} trains through torchao, which is not installed; {_INSTALL}"
        ) from err
    version = _version_tuple(getattr(torchao, "__version__", "0"))
    if version < TORCHAO_MIN_VERSION:
        raise ImportError(
            f"float8={recipe!r} needs torchao >= 0.18 (its float8 training API), found "
            f"{torchao.__version__}; {_INSTALL}"
        )


def check_float8_device(device: torch.device, recipe: str | None) -> None:
    """Raise RuntimeError unless `device` has fp8 tensor cores (CUDA compute capability >= 8.9)."""
    if recipe is None:
        return
    need = ".".join(map(str, FLOAT8_MIN_CAPABILITY))
    if device.type != "cuda":
        raise RuntimeError(
            f"float8={recipe!r} needs an NVIDIA GPU of compute capability >= {need} (L4/L40, H100, H200, "
            f"B200), this run is on {device.type}; train with accelerator='gpu' on such a GPU or pass "
            "float8=None"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        raise RuntimeError(
            f"float8={recipe!r} needs a GPU of compute capability >= {need} (fp8 tensor cores: L4/L40, "
            f"H100, H200, B200); {torch.cuda.get_device_name(device)} has "
            f"{'.'.join(map(str, capability))}; pass float8=None or use such a GPU"
        )


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Whether the linear layer `fqn` trains in fp8 (see the module docstring for what stays out)."""
    if type(module) is not nn.Linear:  # not a plain linear, or converted already
        return False
    last = fqn.rsplit(".", 1)[-1]
    if last == "head" or "router" in fqn.split("."):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: nn.Module, recipe: str) -> list[str]:
    """Swap the eligible `nn.Linear` layers of `model` for torchao's `Float8Linear`, in place, and
    return their names. Call it on the built, initialised model, before `torch.compile`.

    Routed experts are not converted. torchao 0.18's `Float8TrainingOpConfig` (prototype
    `moe_training`) wraps 3-D expert weights so that `torch._grouped_mm` becomes an fp8 rowwise scaled
    grouped GEMM, but its weight-gradient GEMM contracts over each expert's tokens and the kernel
    needs every group non-empty and a multiple of 16 tokens (it does not pad: a device-side assert
    otherwise); `GroupedExperts` takes groups of any size, empty ones included. The wrapped weights (a
    tensor subclass) would also have to go through ZeRO-1's flat buffers, the per-expert checkpoint
    names and expert slicing, untested here.
    """
    check_float8(recipe)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(model, module_filter_fn=float8_filter, config=config)
    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]


def _version_tuple(version: str) -> tuple[int, int]:
    """'0.18.0+cu126' -> (0, 18); (0, 0) when unparsable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)
