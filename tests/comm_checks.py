"""Functions the process pools run for the communication tests: compressed and hierarchical dispatch,
gradient codecs, telemetry against the bytes the collectives really received, and short trainings."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from checks import GLOBAL_BATCH, STEPS, strategy_run

from lightning_dsv3.config import ParallelConfig
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.model.moe import GroupedExperts
from lightning_dsv3.module import DeepSeekV3Module
from lightning_dsv3.parallel.compression import PowerSGDCodec, TopKCodec, get_codec
from lightning_dsv3.parallel.expert import AllToAllDispatcher
from lightning_dsv3.parallel.hierarchical import HierarchicalDispatcher, build_node_groups
from lightning_dsv3.parallel.mesh import build_mesh
from lightning_dsv3.parallel.telemetry import CommTelemetry, Link
from lightning_dsv3.parallel.zero import GradientReducer, ReduceGroup
from lightning_dsv3.strategy import DSV3Strategy

CPU = torch.device("cpu")


def _routed(rank: int, n_tokens: int, n_experts: int, top_k: int, dim: int, dtype: torch.dtype) -> dict:
    """A rank's tokens x (T, dim), a random top-k routing, and its rows sorted by expert as the layer does."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n_tokens, dim, generator=gen).to(dtype)
    indices = torch.rand(n_tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    return {
        "x": x,
        "order": order,
        "token_ids": order // top_k,
        "counts": torch.bincount(flat, minlength=n_experts),
        "weights": torch.rand(n_tokens, top_k, generator=gen).to(dtype),
        "upstream": torch.randn(n_tokens, dim, generator=gen).to(dtype),
    }


def codec_dispatch_check(codec_name: str, dtype_name: str) -> dict[str, Any]:
    """Flat dispatch with and without a codec on the same rows: forward within the codec's bound,
    backward exact (straight-through), or within the bound when the gradient is packed too."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = build_mesh(ParallelConfig(ep=world), world, "cpu")
    codec, dtype = get_codec(codec_name), getattr(torch, dtype_name)
    n_local, dim = 2, 200  # 200 channels: a full and a partial block of 128
    r = _routed(rank, n_tokens=24, n_experts=n_local * world, top_k=2, dim=dim, dtype=dtype)
    rows = r["x"][r["token_ids"]]
    out: dict[str, Any] = {}
    for name, fwd, bwd in [("plain", None, None), ("codec", codec, None), ("codec_grad", codec, codec)]:
        telemetry = CommTelemetry(CPU)
        dispatcher = AllToAllDispatcher(Link(mesh.group("ep"), "ep", telemetry), world, n_local, fwd, bwd)
        leaf = rows.clone().requires_grad_()
        received, _, ctx = dispatcher.dispatch(leaf, r["counts"])
        seed = torch.Generator().manual_seed(2000 + rank)
        upstream = torch.randn(received.shape, generator=seed).to(dtype)
        back = dispatcher.combine(received * 2, ctx)
        ((received * upstream).sum() + back.float().sum()).backward()
        telemetry.end_step()
        out[name] = {"received": received.detach(), "grad": leaf.grad, "back": back.detach()}
        out[name]["stats"] = telemetry.stats()
    plain, coded, coded_grad = out["plain"], out["codec"], out["codec_grad"]
    rt = codec.unpack(codec.pack(plain["received"]), plain["received"].shape, dtype)
    assert torch.equal(coded["received"], rt), "the codec path is not one encode/decode of each row"
    err = (coded["received"].double() - plain["received"].double()).abs()
    assert (err <= codec.max_error(plain["received"], dtype).double()).all()
    assert torch.equal(coded["grad"], plain["grad"]), "straight-through backward must be exact"
    err = (coded_grad["grad"].double() - plain["grad"].double()).abs()
    assert (err <= codec.max_error(plain["grad"], dtype).double()).all()
    assert not torch.equal(coded_grad["grad"], plain["grad"])  # the packed gradient path really ran
    return {"rows": rows.shape[0], "dim": dim, "stats": {k: v["stats"] for k, v in out.items()}}


def empty_rank_check() -> None:
    """Every token picks rank 0's experts: rank 1's experts run on no rows, and its dispatch's backward
    (a collective) must still run, or rank 0 would wait for it forever."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = build_mesh(ParallelConfig(ep=world), world, "cpu")
    dim, n_local = 16, 2
    experts = GroupedExperts(n_local, dim, 8)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.1)
    dispatcher = AllToAllDispatcher(Link(mesh.group("ep"), "ep", CommTelemetry(CPU)), world, n_local)
    x = torch.randn(6, dim, requires_grad=True)
    counts = torch.zeros(n_local * world, dtype=torch.long)
    counts[0] = 6  # every row to expert 0, on rank 0
    received, local_counts, ctx = dispatcher.dispatch(x, counts)
    assert (received.shape[0] == 0) == (rank != 0)
    dispatcher.combine(experts(received, local_counts), ctx).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def hierarchical_check(codec_name: str | None, ranks_per_node: int = 2) -> dict[str, Any]:
    """The same tokens through the flat and the two-hop dispatch: outputs and input gradients agree."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = build_mesh(ParallelConfig(ep=world), world, "cpu")
    nodes = build_node_groups(mesh, ranks_per_node)
    codec = get_codec(codec_name)
    n_local, dim, top_k, n_tokens = 2, 160, 3, 20
    r = _routed(rank, n_tokens, n_experts=n_local * world, top_k=top_k, dim=dim, dtype=torch.float32)
    out: dict[str, Any] = {}
    for mode in ("flat", "hierarchical"):
        telemetry = CommTelemetry(CPU)
        if mode == "flat":
            dispatcher = AllToAllDispatcher(Link(mesh.group("ep"), "ep", telemetry), world, n_local, codec)
        else:
            inter, intra = Link(nodes.inter, "ep_inter", telemetry), Link(nodes.intra, "ep_intra", telemetry)
            dispatcher = HierarchicalDispatcher(inter, intra, nodes.n_nodes, ranks_per_node, n_local, codec)
        x = r["x"].clone().requires_grad_()
        received, counts, ctx = dispatcher.dispatch(x[r["token_ids"]], r["counts"], token_ids=r["token_ids"])
        expert = torch.repeat_interleave(torch.arange(n_local), counts) + rank * n_local
        y = torch.tanh(received) * (expert + 1).unsqueeze(1)  # a different function per expert
        back = dispatcher.combine(y, ctx)
        unsorted = torch.zeros_like(back).index_copy(0, r["order"], back)
        combined = (unsorted.view(n_tokens, top_k, dim) * r["weights"].unsqueeze(-1)).sum(1)
        (combined * r["upstream"]).sum().backward()
        telemetry.end_step()
        out[mode] = {"out": combined.detach(), "grad": x.grad, "stats": telemetry.stats()}
    torch.testing.assert_close(out["hierarchical"]["out"], out["flat"]["out"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["hierarchical"]["grad"], out["flat"]["grad"], rtol=1e-5, atol=1e-6)
    node_of_expert = torch.arange(n_local * world) // (n_local * ranks_per_node)
    expert_of_row = torch.repeat_interleave(torch.arange(n_local * world), r["counts"])
    pairs = {(int(t), int(node_of_expert[e])) for t, e in zip(r["token_ids"], expert_of_row)}
    return {
        "rows": int(r["counts"].sum()),
        "pairs": len(pairs),
        "row_bytes": codec.bytes_per_row(dim) if codec else dim * 4,
        "dim": dim,
        "stats": {k: v["stats"] for k, v in out.items()},
    }


def hierarchical_failure_check(ranks_per_node: int = 2) -> list[str]:
    """The k-th all_to_all_single of a two-hop dispatch, combine and their backward raises on every rank
    (so no peer waits), for each k in turn: what each failure surfaced as, in call order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = build_mesh(ParallelConfig(ep=world), world, "cpu")
    nodes = build_node_groups(mesh, ranks_per_node)
    n_local, dim, top_k, n_tokens = 2, 16, 2, 8
    r = _routed(rank, n_tokens, n_experts=n_local * world, top_k=top_k, dim=dim, dtype=torch.float32)
    telemetry = CommTelemetry(CPU)
    inter, intra = Link(nodes.inter, "ep_inter", telemetry), Link(nodes.intra, "ep_intra", telemetry)
    dispatcher = HierarchicalDispatcher(inter, intra, nodes.n_nodes, ranks_per_node, n_local)
    real = dist.all_to_all_single
    calls = {"n": 0, "fail_at": -1}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] - 1 == calls["fail_at"]:
            raise RuntimeError("[gloo] Timed out waiting 6000ms for recv operation to complete")
        return real(*args, **kwargs)

    def step() -> None:
        x = r["x"].clone().requires_grad_()
        received, _, ctx = dispatcher.dispatch(x[r["token_ids"]], r["counts"], token_ids=r["token_ids"])
        dispatcher.combine(received * 2, ctx).sum().backward()

    errors: list[str] = []
    dist.all_to_all_single = flaky
    try:
        step()  # count the calls
        n_calls = calls["n"]
        for k in range(n_calls):
            calls.update(n=0, fail_at=k)
            try:
                step()
                errors.append("no error")
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
    finally:
        dist.all_to_all_single = real
    return errors


class _Spy(L.Callback):
    """The bytes handed to each collective during the last training batch, per process group."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int]] = []
        self.last: list[tuple[Any, int]] = []
        self.groups: dict[int, tuple[str, ...]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.calls = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.last = list(self.calls)
        strategy = trainer.strategy
        named = [(n, strategy.mesh.group(n)) for n in ("ep", "dp", "dp_ep")]
        if isinstance(strategy.comm.dispatcher, HierarchicalDispatcher):
            named += [(link.name, link.group) for link in strategy.comm.dispatcher.links]
        by_id: dict[int, list[str]] = {}
        for name, group in named:
            by_id.setdefault(id(group), []).append(name)
        self.groups = {k: tuple(sorted(v)) for k, v in by_id.items()}


_INPUT_ARG = {
    "all_to_all_single": 1,
    "all_reduce": 0,
    "reduce_scatter_tensor": 1,
    "all_gather_into_tensor": 1,
}


def comm_run(layout: dict[str, Any], steps: int = STEPS, optim: str = "sgd") -> dict[str, Any]:
    """`strategy_run` with every data-path collective spied on: returns its result plus, for the last
    step, the bytes each process group's collectives received (`spy`: group names -> bytes)."""
    spy = _Spy()
    originals = {name: getattr(dist, name) for name in _INPUT_ARG}

    def spied(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("group") is not None:  # the strategy names its groups; world-wide scalars pass None
                t = args[_INPUT_ARG[name]]
                spy.calls.append((id(kwargs["group"]), t.numel() * t.element_size()))
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, spied(name, fn))
    try:
        result = strategy_run(layout, steps, GLOBAL_BATCH, optim, callbacks=(spy,))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    totals: dict[tuple[str, ...], int] = {}
    for group_id, nbytes in spy.last:
        key = spy.groups.get(group_id, ("unknown",))
        totals[key] = totals.get(key, 0) + nbytes
    return {**result, "spy": totals}


def reducer_codec_check(codec_name: str, zero: bool) -> dict[str, Any]:
    """GradientReducer with a lossless-configured codec equals the exact reduction; returns both."""
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 8))
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(rank * 10 + i)) for i, p in
             enumerate(model.parameters())]  # fmt: skip
    codecs = {
        "topk": lambda: TopKCodec(ratio=1.0),
        "powersgd": lambda: PowerSGDCodec(rank=64, min_compression_rate=0),
    }
    rg = ReduceGroup("dp_ep", group, world, rank)
    results = {}
    for name, codec in [("exact", None), ("codec", codecs[codec_name]())]:
        net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 8))
        net.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        reducer = GradientReducer(net.named_parameters(), opt, lambda n: rg, world, zero, codec=codec,
                                  bucket_bytes=1000)  # fmt: skip
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        reducer.reduce_gradients()
        opt.step()
        reducer.gather_parameters()
        results[name] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(results["codec"], results["exact"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return {"n_buckets": len(reducer.buckets)}


def topk_feedback_check(steps: int) -> dict[str, Any]:
    """Top-k with error feedback over `steps` reductions: what was delivered plus the mean residual
    equals the mean of every input (nothing is lost, only delayed); every rank gets the same result."""
    world, rank = dist.get_world_size(), dist.get_rank()
    codec = TopKCodec(ratio=0.05)
    delivered = torch.zeros(1000)
    inputs = torch.zeros(1000)
    for step in range(steps):
        g = torch.randn(1000, generator=torch.Generator().manual_seed(100 * step + rank))
        inputs += g
        delivered += codec.allreduce(g, None, name="g")
    residual = codec.residuals["g"].clone()
    dist.all_reduce(residual)
    dist.all_reduce(inputs)
    torch.testing.assert_close(delivered + residual / world, inputs / world, rtol=1e-5, atol=1e-5)
    everyone = [torch.empty_like(delivered) for _ in range(world)]
    dist.all_gather(everyone, delivered)
    assert all(torch.equal(t, delivered) for t in everyone), "replicas received different sums"
    return {"sent_fraction": codec.k(1000) / 1000}


def probe_run(layout: dict[str, Any]) -> dict[str, Any]:
    """Two steps with the network probed at start-up: the choices made and the step's metrics."""
    result = strategy_run({**layout, "probe_network": True}, 2, GLOBAL_BATCH, "sgd")
    return {"comm": result["comm"]}


def train_val_loss(layout: dict[str, Any], steps: int, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Train the debug preset on the standard-library corpus for `steps` steps; the validation loss after."""
    L.seed_everything(0, verbose=False)
    module = DeepSeekV3Module(
        preset="debug", model_overrides={"max_seq_len": seq_len, "original_seq_len": seq_len}
    )
    data = DSV3DataModule(seq_len=seq_len, batch_size=batch_size, max_bytes=2**20)
    strategy = DSV3Strategy(**layout)
    trainer = L.Trainer(
        accelerator="cpu", devices=dist.get_world_size(), strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=8, val_check_interval=steps, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return {"val_loss": float(trainer.callback_metrics["val_loss"]), "comm": strategy.communication_stats()}
