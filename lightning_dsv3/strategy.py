"""DSV3Strategy: the Lightning Strategy that owns the (pp, dp, ep) mesh, the step and ZeRO-1.

    Trainer(strategy=DSV3Strategy(pp=1, ep=2), devices=4)      # dp inferred: 4 / (1 * 2) = 2
    Trainer(strategy="dsv3", devices=2)                         # the registry name, pure data parallel

The strategy runs the whole step itself: it splits the per-rank batch into micro-batches, runs
forward and backward for each (the pipeline schedule when pp > 1, or DualPipeV's one-rank V at
pp = 1), and returns the detached loss, so its `backward` does nothing. Gradients are reduced after
the last micro-batch of an optimizer step, before clipping and the optimizer (see `optimizer_step`),
which keeps Lightning's gradient accumulation, clipping, LR schedulers and callbacks working unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn

from lightning_dsv3 import checkpoint as ckpt
from lightning_dsv3 import faults
from lightning_dsv3.config import ParallelConfig
from lightning_dsv3.faults import NonFinitePolicy, collective
from lightning_dsv3.model.transformer import LossOutput
from lightning_dsv3.parallel.comm import (
    Communication,
    make_grad_codec,
    setup_communication,
    validate_node_layout,
)
from lightning_dsv3.parallel.expert import is_expert_param
from lightning_dsv3.parallel.mesh import ParallelMesh, build_mesh, device_type_of
from lightning_dsv3.parallel.telemetry import Link
from lightning_dsv3.parallel.zero import GradientReducer, ReduceGroup
from lightning_dsv3.pipeline.costs import StageCosts, as_layer_costs
from lightning_dsv3.pipeline.runtime import PipelineRuntime, forward_schedule
from lightning_dsv3.pipeline.schedules import make_schedule
from lightning_dsv3.pipeline.stages import StagePlan, TiedCopies

if TYPE_CHECKING:
    from lightning_dsv3.module import DeepSeekV3Module


class DSV3Strategy(ParallelStrategy):
    """Pipeline x data x expert parallelism for `DeepSeekV3Module`.

    Args:
        pp: pipeline stages. dp: data-parallel replicas (None: world / (pp * ep)). ep: expert-parallel size.
        schedule: pipeline schedule name. Used when pp > 1; at pp = 1 only "dualpipev" changes the step:
            the rank holds the V's two chunks (the first half of the layers with the embedding, the
            second with the head and MTP, cut as pipeline stages are) and runs DualPipeV's one-rank
            program, whose FB pairs run one micro-batch's forward with another's backward, so that with
            ep > 1 the dispatch and combine of one run on the communication stream during the other's
            compute (DeepSeek's dual-micro-batch overlap, without a pipeline). Of n >= 2 micro-batches'
            2n chunk forwards, 2n - 3 run paired with a backward (one micro-batch overlaps nothing). Any
            other schedule at pp = 1 runs forward then backward per micro-batch, every exchange exposed.
            Checkpoints name tensors as the whole model does, so they move between the two.
        n_microbatches: micro-batches per step and rank (default: 2 * pp with a pipeline, so 2 for the
            pp = 1 V; 1 without one).
        zero: shard optimizer state (and the fp32 masters of bf16 weights) over the gradient-reducing
            groups (ZeRO-1); fp32 weights are their own masters.
        dispatch_codec: compress the expert dispatch payload ("fp8", "int8"); None sends it as is.
            With the network probed, a payload goes compressed only where that is faster.
        quantize_dispatch_grad: compress the dispatch's gradient too (default: exact, straight-through).
        grad_codec: compress data-parallel gradient reductions ("topk" or "powersgd", with error
            feedback); grad_codec_options: keyword arguments of TopKCodec / PowerSGDCodec, e.g.
            {"ratio": 0.01} or {"rank": 4, "start_iter": 100}. Works with and without ZeRO-1.
        ranks_per_node: consecutive ranks that share a node (None: the devices per node on several
            nodes, one node otherwise). An ep group spanning nodes dispatches in two hops (across
            nodes, then within) unless hierarchical_dispatch=False.
        max_nodes_per_token: node-limited routing, each token's experts on at most this many nodes.
        bucket_bytes: cap on a gradient bucket (None: chosen by the network probe, or no cap).
        layer_costs: with a pipeline (pp = 1 V included): one cost per decoder layer (e.g. measured
            milliseconds), or the `StageCosts` that `lightning_dsv3.pipeline.costs.measure_stage_costs`
            times on the device (layers, head and embedding), or the path of a file its CLI wrote
            (`--save`; every process reads it when the strategy is made, so on several nodes it must
            be on a shared filesystem), to cut the stages by instead of the FLOP model
            (`lightning_dsv3.pipeline.partition`). Every rank takes rank 0's cut.
        probe_network: time the groups' collectives at start-up and choose the bucket cap and whether
            dispatch compression pays (None: on GPUs only).
        start_method: how `devices=N` processes start on one machine when no launcher made them:
            "popen" (re-run the script, like Lightning's "ddp"), "spawn" or "fork".
        timeout: how long any collective of the mesh's groups waits for its peers before it fails
            (a `faults.CollectiveError` naming the operation, the group and its ranks).
        nonfinite: what an optimizer step with a non-finite loss or reduced gradient does: "skip" it
            on every rank (counted as `nonfinite/skipped_steps`), "raise" at once, or "off" (no
            check; it costs one small all-reduce per step, and a host sync unless the optimizer is
            fused, as `DeepSeekV3Module` makes it on GPUs: then the device skips the step and the host
            counts, warns or stops one step later). max_consecutive_nonfinite: under "skip", stop after
            this many non-finite steps in a row. See `lightning_dsv3.faults`.
    """

    strategy_name = "dsv3"

    def __init__(
        self,
        pp: int = 1,
        dp: int | None = None,
        ep: int = 1,
        schedule: str = "1f1b",
        n_microbatches: int | None = None,
        zero: bool = True,
        dispatch_codec: str | None = None,
        quantize_dispatch_grad: bool = False,
        grad_codec: str | None = None,
        grad_codec_options: dict[str, Any] | None = None,
        ranks_per_node: int | None = None,
        max_nodes_per_token: int | None = None,
        hierarchical_dispatch: bool | None = None,
        bucket_bytes: int | None = None,
        probe_network: bool | None = None,
        layer_costs: list[float] | tuple[float, ...] | StageCosts | str | Path | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_nonfinite: int = 5,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.parallel_config = ParallelConfig(
            pp=pp, dp=dp, ep=ep, schedule=schedule, n_microbatches=n_microbatches, zero=zero,
            dispatch_codec=dispatch_codec, quantize_dispatch_grad=quantize_dispatch_grad,
            grad_codec=grad_codec, grad_codec_options=grad_codec_options or {}, ranks_per_node=ranks_per_node,
            max_nodes_per_token=max_nodes_per_token, hierarchical_dispatch=hierarchical_dispatch,
            bucket_bytes=bucket_bytes,
            layer_costs=as_layer_costs(layer_costs),  # a costs file is read now: a bad path fails here
        )  # fmt: skip
        make_grad_codec(grad_codec, grad_codec_options or {})  # refuse bad options now
        if start_method not in ("popen", "spawn", "fork"):
            raise ValueError(f"start_method must be 'popen', 'spawn' or 'fork', got {start_method!r}")
        self._start_method = start_method
        self._process_group_backend = process_group_backend
        if timeout is not None and timeout.total_seconds() <= 0:
            raise ValueError(
                f"timeout must be a positive timedelta (or None for torch's default), got {timeout}"
            )
        self._timeout = timeout
        self.nonfinite = faults.NonFiniteGuard(nonfinite, max_consecutive_nonfinite)
        self._probe_network = probe_network
        self.comm: Communication | None = None
        self.mesh: ParallelMesh | None = None
        self.reducer: GradientReducer | None = None
        self.plan: StagePlan | None = None
        self.runtime: PipelineRuntime | None = None
        self.tied: TiedCopies | None = None
        self._parked: list[tuple[torch.nn.Parameter, Tensor]] = []
        self.num_nodes = 1

    # ---- Lightning plumbing --------------------------------------------------------------------
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "dsv3", cls, description="DeepSeek-V3 pipeline x data x expert parallelism with ZeRO-1"
        )

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        """Tells Lightning to inject a DistributedSampler built from `distributed_sampler_kwargs`."""
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Each (dp, ep) pair reads its own slice; the pipeline ranks of one slice read the same one."""
        mesh = self._require_mesh()
        return {"num_replicas": mesh.data_size, "rank": mesh.data_rank}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self.parallel_config.resolve(
            self.num_nodes * self.num_processes
        )  # refuse a bad mesh before launching
        if self.cluster_environment.creates_processes_externally:
            return
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    def setup_environment(self) -> None:
        self._validate(self.num_nodes * self.num_processes)
        super().setup_environment()
        reset_seed()
        self._set_world_ranks()
        self._process_group_backend = (
            self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        )
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        if (store := faults.restart_store(self._timeout)) is not None:
            kwargs["store"] = store
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        self.mesh = build_mesh(self.parallel_config, self.world_size, device_type_of(self.root_device))
        if self.plan is not None:
            self._adopt_rank_zero_cut(self.plan)
        if self._timeout is not None and self.mesh.device_mesh is not None:
            faults.set_group_timeouts(
                (self.mesh.group(g) for g in ("pp", "dp", "ep", "dp_ep")), self._timeout
            )

    def _adopt_rank_zero_cut(self, plan: StagePlan) -> None:
        """Costs measured in each process differ by noise (or were measured on rank 0 alone), and a cut
        that differs between ranks would build mismatched stages: every rank takes rank 0's ranges."""
        layers = [[(r.start, r.stop) for r in plan.layers]]
        with collective("the stage cut's broadcast", None, "world"):
            dist.broadcast_object_list(layers, src=0)
        plan.layers = [range(start, stop) for start, stop in layers[0]]

    def _validate(self, world_size: int) -> None:
        """Every check that needs no process group: the mesh against the world, the model and the data."""
        config = self.parallel_config.resolve(world_size)
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "DSV3Strategy runs backward inside its training step, where a precision plugin's gradient "
                "scaler cannot scale the loss (precision='16-mixed'); use precision='bf16-mixed', "
                "'bf16-true' or '32-true'"
            )
        self.module.check_data(getattr(self.module._trainer, "datamodule", None))
        if config.pipelined:
            schedule = make_schedule(config.schedule, config.pp, self.n_microbatches())
            self.plan = StagePlan.build(self.module.config, schedule, layer_costs=config.layer_costs)
        n_experts = self.module.config.n_routed_experts
        if self.module.config.n_moe_layers and n_experts % config.ep != 0:
            raise ValueError(
                f"ep={config.ep} does not divide n_routed_experts={n_experts}; choose an ep among "
                f"{[d for d in range(1, n_experts + 1) if n_experts % d == 0]}"
            )
        validate_node_layout(config, self.module.config, self._ranks_per_node())

    def _ranks_per_node(self) -> int | None:
        """As given, else the devices per node when there are several nodes (None: one node)."""
        if self.parallel_config.ranks_per_node is not None:
            return self.parallel_config.ranks_per_node
        return self.num_processes if self.num_nodes > 1 else None

    def _set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    def _require_mesh(self) -> ParallelMesh:
        if self.mesh is None:
            raise RuntimeError("the device mesh exists once the Trainer has set up the strategy")
        return self.mesh

    @property
    def module(self) -> DeepSeekV3Module:
        from lightning_dsv3.module import DeepSeekV3Module

        module = self.lightning_module
        if not isinstance(module, DeepSeekV3Module):
            raise TypeError(
                f"DSV3Strategy trains a lightning_dsv3.module.DeepSeekV3Module (or a subclass), got "
                f"{type(module).__name__}; use Lightning's DDP or FSDP strategies for other modules"
            )
        return module

    # ---- model and optimizer -------------------------------------------------------------------
    def build_model(self, module: DeepSeekV3Module) -> nn.Module:
        """The whole model, or this rank's pipeline chunks (called from `module.configure_model`)."""
        if self.plan is None:
            return module.build_chunk()
        specs = self.plan.chunks_of(self._require_mesh().pp_rank)
        return nn.ModuleList(
            module.build_chunk(s.layer_ids, s.with_embedding, s.with_head, pipelined=True) for s in specs
        )

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        mesh = self._require_mesh()
        module = self.module
        module.configure_model()
        probe = self.root_device.type == "cuda" if self._probe_network is None else self._probe_network
        self.comm = setup_communication(
            mesh.config,
            mesh,
            module.config,
            self.root_device,
            self._ranks_per_node(),
            probe,
            rank_zero_info,
            self._timeout,
        )
        for chunk in module.chunks():
            self.comm.install(chunk, mesh)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.plan is not None:
            self.runtime = PipelineRuntime(
                self.plan.schedule, module.chunks(), mesh.pp_rank, mesh.group("pp"), mesh.global_rank_of,
                module.chunk_loss,
            )  # fmt: skip
            coord = (mesh.dp_rank, mesh.ep_rank)
            self.tied = TiedCopies(self.plan, module.config, mesh.pp_rank, mesh.dp, mesh.ep, coord)
        self.barrier("model ready")
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._wrap_optimizer()
        self.setup_precision_plugin()

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _wrap_optimizer(self) -> None:
        if len(self.optimizers) != 1:
            raise ValueError(
                f"DSV3Strategy supports one optimizer, configure_optimizers returned {len(self.optimizers)}"
            )
        mesh = self._require_mesh()
        dense = ReduceGroup("dp_ep", mesh.group("dp_ep"), mesh.data_size, mesh.data_rank)
        expert = ReduceGroup("dp", mesh.group("dp"), mesh.dp, mesh.dp_rank)
        comm = self._require_comm()
        if self.reducer is not None:  # a new fit on the same strategy: the old hooks go with the old reducer
            self.reducer.remove_hooks()
        self.reducer = GradientReducer(
            self.model.named_parameters(),
            self.optimizers[0],
            group_of=lambda name: expert if is_expert_param(name) else dense,
            n_data_slices=mesh.data_size,
            zero=self.parallel_config.zero,
            copies=self._copies_of,
            codec=comm.grad_codec,
            bucket_bytes=comm.bucket_bytes,
            telemetry=comm.telemetry,
        )

    def _copies_of(self, name: str) -> int:
        """How many chunks of the pipeline hold the parameter `name` (named model.<chunk>.<name>)."""
        if self.tied is None:
            return 1
        return self.tied.copies.get(name.split(".", 2)[2], 1)

    # ---- the step ------------------------------------------------------------------------------
    def n_microbatches(self) -> int:
        """Micro-batches per step: as given, else 1 without a pipeline and 2 * pp with one."""
        return self.parallel_config.microbatches

    def split_microbatches(self, batch: Tensor) -> list[Tensor]:
        m = self.n_microbatches()
        if batch.shape[0] % m != 0:
            raise ValueError(
                f"the per-rank batch of {batch.shape[0]} sequences does not split into n_microbatches={m}; "
                f"use a batch_size that is a multiple of {m} or another n_microbatches"
            )
        return list(batch.chunk(m))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Forward and backward of every micro-batch; returns the detached global objective."""
        module = self.module
        module.check_tokens(batch)
        micro = self.split_microbatches(batch)
        if batch_idx % self._accumulation() == 0:
            # Lightning zeroes gradients after the training step; ours run backward inside it
            self.model.zero_grad(set_to_none=True)
        grad_scale = 1.0 / (len(micro) * self._accumulation())
        for chunk in module.chunks():
            chunk.set_aux_loss_scale(grad_scale)
        with self.precision_plugin.train_step_context():
            if self.runtime is not None:
                outs = [out for _, out in self.runtime.run(micro, grad_scale)]
            else:
                outs = []
                last_step = (batch_idx + 1) % self._accumulation() == 0
                for i, mb in enumerate(micro):
                    if last_step and i == len(micro) - 1 and self.reducer is not None:
                        self.reducer.arm()  # buckets reduce while this last backward runs
                    out = module.model.training_loss(mb)
                    (out.loss * grad_scale).backward()
                    outs.append(out)
        loss, ce, mtp = self._global_losses(outs, len(micro))
        global_batch = batch.shape[0] * self._require_mesh().data_size
        module.log_reduced_losses("train", ce, mtp, batch_size=global_batch)
        self._park_gradients()
        self.nonfinite.observe_loss(loss)
        return loss

    def _park_gradients(self) -> None:
        """Lightning zeroes gradients between the training step and `backward`; keep ours out of reach."""
        self._parked = []
        for p in self.model.parameters():
            if p.grad is not None:
                self._parked.append((p, p.grad))
                p.grad = None

    def _eval_step(self, batch: Tensor) -> LossOutput:
        """Forward-only pass over the pipeline (or the whole model) -> the global losses."""
        module = self.module
        module.check_tokens(batch)
        if self.runtime is None:
            outs = [module.model.training_loss(batch)]
            n = 1
        else:
            micro = self.split_microbatches(batch)
            outs = [out for _, out in self.runtime.forward_only(forward_schedule(self.plan.schedule), micro)]
            n = len(micro)
        loss, ce, mtp = self._global_losses(outs, n)
        return LossOutput(loss=loss, ce=ce, mtp=mtp)

    def validation_step(self, batch: Tensor, batch_idx: int, *args: Any) -> None:
        with self.precision_plugin.val_step_context():
            out = self._eval_step(batch)
        self.module.record_validation(out, batch_size=batch.shape[0] * self._require_mesh().data_size)

    def test_step(self, batch: Tensor, batch_idx: int, *args: Any) -> None:
        with self.precision_plugin.test_step_context():
            out = self._eval_step(batch)
        self.module.log("test_loss", out.ce, batch_size=batch.shape[0] * self._require_mesh().data_size)

    def _accumulation(self) -> int:
        trainer = self.lightning_module.trainer
        return trainer.accumulate_grad_batches if trainer is not None else 1

    def _global_losses(self, outs: list[LossOutput], n_micro: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Mean over every micro-batch of every data slice of the objective, the CE and each MTP depth.

        Each micro-batch's loss exists on one rank of its pipeline (its last stage), so local sums are
        added over the whole world and divided by micro-batches x data slices.
        """
        depth = self.module.config.mtp_depth
        device = self.root_device
        values = torch.zeros(2 + depth, device=device)
        for o in outs:
            mtp = [m.float() for m in o.mtp] + [torch.zeros((), device=device)] * (depth - len(o.mtp))
            values += torch.stack([o.loss.detach().float(), o.ce.float(), *mtp])
        if _distributed_is_initialized() and self.world_size > 1:
            with collective("loss all_reduce", None, "world"):
                dist.all_reduce(values)
        values /= n_micro * self._require_mesh().data_size
        return values[0], values[1], list(values[2:])

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The training step already ran backward for every micro-batch: put its gradients back.

        Under gradient accumulation they add to what earlier micro-steps left.
        """
        for p, grad in self._parked:
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self._parked = []
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """Reduce gradients right after the step's last backward, then clip and step; ZeRO gathers after.

        A step whose loss or reduced gradients are not finite is skipped on every rank (see `nonfinite`):
        its gradients are dropped before clipping, so the optimizer leaves every parameter as it was; a
        fused optimizer skips it from a device flag instead, without the host waiting for the check.
        """
        mesh = self._require_mesh()

        def closure_then_reduce() -> Any:
            result = closure()
            if self.tied is not None:
                with collective("tied-copy gradient sync", mesh.group("pp"), "pp"):
                    self.tied.sync(self.tied.grads_by_name(self.module.chunks()))
            if self.reducer is not None:
                with collective("gradient reduction", mesh.group("dp_ep"), "dp_ep (dense) and dp (experts)"):
                    self.reducer.reduce_gradients()
                step = self.lightning_module.trainer.global_step
                if self.nonfinite.enabled:  # "off": not even the list of gradients is built
                    grads = faults.reduced_gradients(self.reducer)
                    if self.nonfinite.decides_on_device(optimizer):  # no host wait: found_inf
                        self.nonfinite.check_on_device(grads, step, optimizer)
                    elif self.nonfinite.check(grads, step):
                        faults.drop_gradients(self.model, self.reducer)
            return result

        out = super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)
        if self.reducer is not None:
            with collective(
                "ZeRO-1 parameter all_gather", mesh.group("dp_ep"), "dp_ep (dense) and dp (experts)"
            ):
                self.reducer.gather_parameters()
        if self.comm is not None:
            self.comm.telemetry.end_step()
        return out

    def clip_gradients_by_global_norm(self, max_norm: float) -> Tensor:
        """Clip by the norm of the whole model's gradient across every rank of the mesh."""
        assert self.reducer is not None
        sq = self.reducer.grad_norm_sq_owned()
        if _distributed_is_initialized() and self.world_size > 1:
            with collective("gradient norm all_reduce", None, "world"):
                dist.all_reduce(sq)
        norm = sq.sqrt()
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        self.reducer.scale_gradients(factor)
        return norm

    # ---- checkpoints ---------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Empty: `save_checkpoint` writes the live, sharded model through DCP instead."""
        return {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The param groups' hyperparameters only: `save_checkpoint` writes the rest through DCP."""
        return ckpt.param_group_state(optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write a sharded checkpoint folder at `filepath` (every rank takes part)."""
        if storage_options is not None:
            raise TypeError(
                "DSV3Strategy writes checkpoints through torch.distributed.checkpoint; drop storage_options"
            )
        path = Path(self.broadcast(str(filepath)))
        meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        meta["dsv3"] = ckpt.describe(self._require_mesh().config, self.module.config)
        ckpt.save(path, self.model, self.reducer, meta, self.global_rank)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load this rank's part of a checkpoint written on any mesh; returns Lightning's remaining state.

        Rank 0 picks the folder (`checkpoint.resolve`: a corrupt `last.ckpt`, what `ckpt_path="last"`
        finds, falls back to the newest good checkpoint beside it) and every rank loads it, or every
        rank raises rank 0's error.
        """
        chosen: tuple[str | None, Exception | None] = (None, None)
        if self.is_global_zero:
            try:
                chosen = (str(ckpt.resolve(Path(checkpoint_path))), None)
            except (OSError, ValueError, RuntimeError) as err:
                chosen = (None, err)
        path, error = self.broadcast(chosen)
        if error is not None:
            raise error
        return ckpt.load(Path(path), self.model, self.reducer, self.module.config)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Already loaded by `load_checkpoint`."""

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Already loaded by `load_checkpoint`."""

    def remove_checkpoint(self, filepath: Any) -> None:
        """ModelCheckpoint's retention (save_top_k) removes folders, and save_last="link" symlinks."""
        if self.is_global_zero:
            ckpt.remove(Path(filepath))

    # ---- collectives ---------------------------------------------------------------------------
    def reduce_expert_loads(self, loads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum routers' per-expert token counts over every rank that routes tokens of the layer.

        That is the stage's dp x ep ranks and, under DualPipe, the mirror copy of the stage.
        """
        if self.tied is not None:
            self.tied.sync({f"{name}.expert_load": [load] for name, load in loads.items()})
        mesh = self._require_mesh()
        group = mesh.group("dp_ep")
        if group is None or mesh.data_size == 1 or not loads:
            return loads
        names = sorted(loads)
        flat = torch.cat([loads[n].reshape(-1) for n in names])
        with collective("expert load all_reduce", group, "dp_ep"):
            Link(group, "dp_ep", self._require_comm().telemetry).all_reduce(flat, "expert_load_all_reduce")
        return dict(zip(names, flat.split([loads[n].numel() for n in names])))

    # ---- communication telemetry ---------------------------------------------------------------
    def _require_comm(self) -> Communication:
        if self.comm is None:
            raise RuntimeError("communication is set up with the model, in the Trainer's setup")
        return self.comm

    def communication_stats(self) -> dict[str, float]:
        """The last optimizer step's communication on this rank, as flat metrics for a logger.

        Each stream of collectives is `comm/<group>.<op>/<metric>`:
        - group: `ep` (flat expert dispatch), `ep_inter` / `ep_intra` (two-hop dispatch: across nodes,
          within a node), `dp_ep` (dense gradients, expert loads), `dp` (routed-expert gradients);
        - op: `dispatch_counts` (the split sizes), `dispatch_meta` (two-hop: which experts of a node a
          token chose), `dispatch`, `dispatch_backward`, `combine`, `combine_backward`, `all_reduce`
          (gradients; with a grad codec the compressed reduction, whatever collective carries it),
          `reduce_scatter` and `all_gather` (ZeRO-1), `expert_load_all_reduce`;
        - metric: `bytes` (uncompressed), `bytes_sent` (handed to the collective), `time_ms` (on the
          wire, overlapping calls counted once), `gbps` (bytes_sent / time, 10^9 bytes/s), `peak_gbps`
          (what the start-up probe measured at those sizes; only when probed), `compression_ratio`
          (bytes / bytes_sent), `calls`.
        `comm/total/<metric>` sums every stream (no peak). The start-up choices are
        `comm/choice/bucket_bytes`, `comm/choice/dispatch_codec_on` (1 or 0, for the latest payload
        size) and `comm/choice/dispatch_codec_saving_ms` (predicted per dispatch; negative: off).
        Definitions in `lightning_dsv3.parallel.telemetry`. Empty before the first optimizer step;
        validation is not counted; the loss and norm reductions (a few scalars) and the pipeline's
        point-to-point transfers are not recorded. On GPUs, reading it waits for the step's last
        recorded collective.
        """
        return self.comm.telemetry.stats() if self.comm is not None else {}

    def on_validation_start(self) -> None:
        if self.comm is not None:
            self.comm.telemetry.enabled = False

    def on_validation_end(self) -> None:
        if self.comm is not None:
            self.comm.telemetry.enabled = True

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Reduce over the whole world (Lightning's `sync_dist`), or over `group` when given."""
        if not isinstance(tensor, Tensor) or not _distributed_is_initialized() or self.world_size == 1:
            return tensor
        op = str(reduce_op).lower() if reduce_op is not None else "mean"
        out = tensor.clone().float() if tensor.dtype in (torch.int32, torch.int64) else tensor.clone()
        if op in ("mean", "avg", "reduceop.avg"):
            dist.all_reduce(out, group=group)
            return out / dist.get_world_size(group)
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(out, op=ops.get(op.removeprefix("reduceop."), dist.ReduceOp.SUM), group=group)
        return out

    def barrier(self, name: str | None = None) -> None:
        if not _distributed_is_initialized():
            return
        with collective(f"barrier {name!r}", None, "world"):
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        with collective(f"broadcast from rank {src}", None, "world"):
            dist.broadcast_object_list(box, src)
        return box[0]

    def tensor_init_context(self, empty_init: bool | None = None) -> Any:
        return nullcontext()

    def on_train_end(self) -> None:
        """The last step's non-finite verdict, if the device decided it, is read before fit returns."""
        self.nonfinite.settle()
        super().on_train_end()

    def teardown(self) -> None:
        if self.runtime is not None:
            self.runtime.drop_graphs()
        assert self.cluster_environment is not None
        self.cluster_environment.teardown()
        super().teardown()

    def optimizer_state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state on this rank and what an unsharded optimizer would hold."""
        assert self.reducer is not None, "the optimizer exists once fitting has started"
        return self.reducer.optimizer_state_bytes()
