"""DeepSeekV3Module: the LightningModule that supplies the model, the loss and the logging.

With Lightning's own strategies it trains the whole model the plain way. With `DSV3Strategy` the
strategy builds only this rank's pipeline chunks (through `build_chunk`) and runs the schedule
itself, calling `chunk_loss` on the last stage; everything the module logs stays the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from lightning_dsv3.config import ModelConfig, get_preset
from lightning_dsv3.float8 import check_float8, check_float8_device, convert_to_float8
from lightning_dsv3.model.transformer import LossOutput, Transformer

# what `DeepSeekV3Module(compile=...)` takes: off, torch.compile's default mode, or one of its modes
COMPILE_MODES: tuple[bool | str, ...] = (False, True, "default", "reduce-overhead")
# torch.compile's modes that autotune GEMMs, refused with this reason
AUTOTUNE_REFUSED = (
    "torch.compile's max-autotune modes can fail on the routed experts (torch 2.11 on an H100, "
    "benchmarks/results/grouped_gemm-mini-autotune-logs-*): Inductor's Triton grouped-GEMM template and "
    "aten's kernel time within 3% of each other at mini's forward shapes, and where the template wins, its "
    "fused bf16 cast of the weights builds a TMA descriptor Triton rejects ('Tensor descriptor last dim "
    'must be 1\'), so compilation fails or not on timing noise. Use compile=True or "reduce-overhead"'
)


class DeepSeekV3Module(L.LightningModule):
    """Next-token (+ MTP) training of a DeepSeek-V3 model, AdamW with warm-up and cosine decay.

    Args:
        preset: name of a preset in `lightning_dsv3.config.PRESETS`.
        model_overrides: fields of `ModelConfig` to change on top of the preset.
        lr, weight_decay, betas: AdamW settings; norms, biases and the router bias are not decayed.
        warmup_steps: linear warm-up length in optimizer steps.
        min_lr_ratio: the cosine decays to `lr * min_lr_ratio` at the last optimizer step.
        init_seed: the seed of the weight initialisation (each tensor seeded by its name).
        compile: torch.compile each decoder layer and the cross-entropy (fuses the norms, rope, routing
            and casts): True for torch.compile's default mode, or a mode name: "reduce-overhead" also
            replays each layer's kernels as a CUDA graph, which removes the launch gaps of a small
            model's step (benchmarks/results/end_to_end-*). Pipeline stages cannot use torch.compile's
            graphs (a stage keeps several micro-batches' outputs alive, which a replay would
            overwrite): in such a mode they compile without them and the pipeline runtime captures
            their decoder layers itself, once per micro-batch in flight (`pipeline.graphs`). The
            max-autotune modes are refused (`AUTOTUNE_REFUSED` says why).
        float8: train the linear layers in fp8 through torchao: "tensorwise" (fastest) or "rowwise"
            (finer scales); None (the default) keeps the Trainer's `precision`. Needs torchao >= 0.18
            (`pip install 'lightning-dsv3[fp8]'`) and a GPU of compute capability >= 8.9; the head,
            the embedding, the router gate, the routed experts and linears whose sizes are not
            multiples of 16 stay in the Trainer's precision (`lightning_dsv3.float8` says why).
            Parameter names do not change: checkpoints load with or without it.
        check_token_ids: refuse a batch holding a token id the embedding cannot hold, with the id;
            None checks batches on the CPU only, since reading the maximum id syncs with a GPU.
    """

    def __init__(
        self,
        preset: str = "debug",
        model_overrides: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        init_seed: int = 0,
        compile: bool | str = False,
        check_token_ids: bool | None = None,
        float8: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config: ModelConfig = get_preset(preset, **(model_overrides or {}))
        check_float8(float8)
        if compile in ("max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile={compile!r}: {AUTOTUNE_REFUSED}")
        if compile not in COMPILE_MODES:
            raise ValueError(
                f"compile={compile!r} is not an option; pass one of {COMPILE_MODES} (True is torch.compile's "
                "default mode)"
            )
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio within [0, 1]")
        self.model: Transformer | None = None
        self.val_ce = MeanMetric()

    # ---- model construction ------------------------------------------------------------------
    def build_chunk(
        self,
        layer_ids: Sequence[int] | None = None,
        with_embedding: bool = True,
        with_head: bool = True,
        pipelined: bool = False,
    ) -> Transformer:
        """One initialised model chunk (the whole model by default); the strategy asks for stages,
        `pipelined` when the pipeline runtime runs them (compiled without torch.compile's CUDA graphs;
        the runtime graphs their layers itself where the mode asks for graphs)."""
        chunk = Transformer(self.config, layer_ids, with_embedding, with_head)
        chunk.init_weights(self.hparams.init_seed)
        if self.hparams.get("float8"):  # before compile, so the compiled layers trace the fp8 linears
            convert_to_float8(chunk, self.hparams.float8)
        if self.hparams.compile:
            mode = None if self.hparams.compile is True else self.hparams.compile
            chunk.compile_parts(mode, pipelined)
        return chunk

    def configure_model(self) -> None:
        """The whole model, or the chunks this rank holds when the strategy plans a pipeline."""
        if self.model is None:
            build = getattr(self.trainer.strategy, "build_model", None) if self._trainer else None
            self.model = build(self) if build is not None else self.build_chunk()

    # ---- steps -------------------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """batch: (batch, seq + 1) token ids."""
        self.check_tokens(batch)
        out = self.model.training_loss(batch)
        self.log_losses(out, "train", batch_size=batch.shape[0])
        return out.loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.check_tokens(batch)
        out = self.model.training_loss(batch)
        self.record_validation(out, batch_size=batch.shape[0])

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.check_tokens(batch)
        out = self.model.training_loss(batch)
        self.log("test_loss", out.ce, batch_size=batch.shape[0], sync_dist=True)

    def chunk_loss(self, chunk: Transformer, h: torch.Tensor, tokens: torch.Tensor) -> LossOutput:
        """The loss of the last pipeline stage: h (batch, seq, dim) and tokens (batch, seq + 1)."""
        return chunk.loss(h, tokens)

    # ---- logging -----------------------------------------------------------------------------
    def _on_progress_bar(self) -> bool:
        """Whether a progress bar shows the losses. Lightning reads every progress-bar value back to the
        host after each batch, a wait for the device per step (benchmarks/results/end_to_end-mini-profile-*),
        so without a bar to show them they are logged only."""
        return self._trainer is None or self.trainer.progress_bar_callback is not None

    def log_losses(self, out: LossOutput, stage: str, batch_size: int) -> None:
        self.log(
            f"{stage}_loss", out.ce, prog_bar=self._on_progress_bar(), batch_size=batch_size, sync_dist=True
        )
        for k, mtp in enumerate(out.mtp, start=1):
            self.log(f"{stage}_mtp{k}_loss", mtp, batch_size=batch_size, sync_dist=True)

    def log_reduced_losses(
        self, stage: str, ce: torch.Tensor, mtp: list[torch.Tensor], batch_size: int
    ) -> None:
        """Log losses a strategy already averaged over the global batch (no further sync)."""
        self.log(f"{stage}_loss", ce, prog_bar=self._on_progress_bar(), batch_size=batch_size)
        for k, value in enumerate(mtp, start=1):
            self.log(f"{stage}_mtp{k}_loss", value, batch_size=batch_size)

    def record_validation(self, out: LossOutput, batch_size: int) -> None:
        self.val_ce.update(out.ce, weight=batch_size)
        self.log("val_loss", out.ce, prog_bar=True, batch_size=batch_size, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val_ppl", torch.exp(self.val_ce.compute()), sync_dist=True)
        self.val_ce.reset()

    # ---- aux-loss-free balancing -------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Move each router's bias against the load it saw since the last step, and log the balance.

        The strategy sums the counts over every rank that routes tokens of the layer (and over the
        pipeline copies of the layer; under Lightning's own strategies, over every rank), so replicas
        keep identical biases;
        max violation = max load / mean load - 1. When the strategy skips a non-finite step, the bias
        stays and the step's counts are dropped (decided on the host, or on the device by the flag the
        strategy also gives a fused optimizer).
        """
        routers = {name: router for chunk in self.chunks() for name, router in chunk.routers()}
        guard = getattr(self.trainer.strategy, "nonfinite", None)
        keep: torch.Tensor | float = 1.0
        if guard is not None and guard.enabled:
            self.log("nonfinite/skipped_steps", guard.skipped_steps(), batch_size=1)
            if guard.skip_step:
                for router in routers.values():
                    router.expert_load.zero_()
                return
            if guard.found_inf is not None:
                keep = 1.0 - guard.found_inf
        loads = {name: router.expert_load.clone() for name, router in routers.items()}
        reduce = getattr(self.trainer.strategy, "reduce_expert_loads", None)
        if reduce is not None:
            loads = reduce(loads)
        elif self.trainer.world_size > 1:  # Lightning's DDP or FSDP: every rank a replica, sum over all
            loads = sum_over_ranks(self.trainer.strategy, loads)
        violations = []
        for name, router in routers.items():
            load = loads[name]
            # on the device, no `if`: reading a value back would stall the host once per layer and step
            violation = torch.where(load.sum() > 0, load.max() / load.mean() - 1, 0.0)
            violations.append(violation)
            self.log(f"balance/max_violation/{name.removesuffix('.ffn.router')}", violation, batch_size=1)
            router.update_bias(load, keep)
        if violations:
            self.log("balance/max_violation", torch.stack(violations).max(), batch_size=1)

    def chunks(self) -> list[Transformer]:
        """The model chunks on this rank: the whole model, or the strategy's pipeline chunks."""
        return [self.model] if isinstance(self.model, Transformer) else list(self.model)

    # ---- optimisation ------------------------------------------------------------------------
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Norm clipping uses the norm of the whole model, across every rank of a DSV3Strategy mesh."""
        clip_global = getattr(self.trainer.strategy, "clip_gradients_by_global_norm", None)
        if gradient_clip_val and clip_global is not None and gradient_clip_algorithm in (None, "norm"):
            clip_global(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """AdamW over `groups`: the hook a subclass overrides to wrap it (benchmarks/zero.py shards it)."""
        # fused on GPUs: one kernel per group instead of torch's foreach path (several passes over
        # parameters and moments, the largest non-GEMM cost of the mini preset's step)
        fused = all(p.is_cuda for group in groups for p in group["params"]) or None
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=fused)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer(decay_groups(self.named_parameters(), self.hparams.weight_decay))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        """Refuse data the model cannot take, before the first step (`DSV3Strategy` checks earlier),
        and fp8 on a device without fp8 tensor cores, before the model is built."""
        self.check_data(getattr(self.trainer, "datamodule", None))
        check_float8_device(self.trainer.strategy.root_device, self.hparams.get("float8"))

    def check_data(self, datamodule: Any) -> None:
        """Raise ValueError if the data module's token ids or sequence length do not fit the model."""
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.config.vocab_size:
            raise ValueError(
                f"the data's tokenizer has {vocab} token ids but the model's vocab_size is "
                f"{self.config.vocab_size}; pass model_overrides={{'vocab_size': {vocab}}} "
                "or another tokenizer"
            )
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"the data's seq_len={seq_len} exceeds the model's max_seq_len={self.config.max_seq_len} "
                f"(the length of its rotary table); pass model_overrides={{'max_seq_len': {seq_len}}} "
                "(with rope_factor > 1 to extend by YaRN) or a smaller seq_len"
            )

    def check_tokens(self, batch: torch.Tensor) -> None:
        """Raise ValueError naming a token id of `batch` outside [0, vocab_size) (see check_token_ids)."""
        check = self.hparams.check_token_ids
        if check is False or (check is None and batch.device.type != "cpu"):
            return
        low, high = int(batch.min()), int(batch.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"the batch holds token id {bad}, outside the model's vocabulary of "
                f"{self.config.vocab_size} ids [0, {self.config.vocab_size}); check the tokenizer against "
                "model_overrides['vocab_size']"
            )


def decay_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two param groups: matrices decay, norms and vectors do not."""
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 and "norm" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sum_over_ranks(strategy: Any, loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`loads` summed over every rank with the strategy's own reduce, in one collective."""
    names = list(loads)
    flat = strategy.reduce(torch.cat([loads[n].reshape(-1) for n in names]), reduce_op="sum")
    return dict(zip(names, flat.split([loads[n].numel() for n in names])))


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
