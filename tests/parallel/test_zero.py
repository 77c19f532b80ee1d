"""ZeRO-1's master shards in one process: fp32 parameters are their own masters, bf16 ones get fp32 copies."""

from __future__ import annotations

import copy

import torch

from lightning_dsv3.parallel.zero import GradientReducer, ReduceGroup

GROUP = ReduceGroup("dp_ep", None, 1, 0)


def _net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(dtype)


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, reducer: GradientReducer | None) -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    net(x.to(next(net.parameters()).dtype)).float().square().sum().backward()
    if reducer is not None:
        reducer.reduce_gradients()
    opt.step()
    opt.zero_grad()
    if reducer is not None:
        reducer.gather_parameters()


def test_fp32_parameters_are_their_own_master_and_step_like_the_plain_optimizer() -> None:
    net, ref = _net(torch.float32), _net(torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    reducer = GradientReducer(net.named_parameters(), opt, lambda n: GROUP, 1, zero=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for _ in range(3):
        _step(net, opt, reducer)
        _step(ref, ref_opt, None)
    (bucket,) = reducer.buckets
    assert bucket.master.data_ptr() == bucket.storage.data_ptr()  # the shard is the parameters' buffer
    assert all(p.untyped_storage().data_ptr() == bucket.storage.untyped_storage().data_ptr()
               for p in net.parameters())  # fmt: skip
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    state = reducer.optimizer_state_bytes()
    assert state["local"] == state["replicated"] == 2 * 4 * bucket.numel  # two moments, no master copy


def test_bf16_parameters_keep_an_fp32_master_that_the_gather_rounds_into_them() -> None:
    net = _net(torch.bfloat16)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    reducer = GradientReducer(net.named_parameters(), opt, lambda n: GROUP, 1, zero=True)
    before = copy.deepcopy(net)
    _step(net, opt, reducer)
    (bucket,) = reducer.buckets
    assert bucket.storage is None and bucket.master.dtype == torch.float32
    for p, offset in zip(net.parameters(), bucket.offsets):
        assert torch.equal(p, bucket.master[offset : offset + p.numel()].view_as(p).to(torch.bfloat16))
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before.parameters()))
    state = reducer.optimizer_state_bytes()
    assert state["local"] == 3 * 4 * bucket.numel  # two moments and the fp32 master
