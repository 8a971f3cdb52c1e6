"""model.sync_bn: BatchNorm statistics over the global batch. W = 2 gloo ranks, each holding half of the batch,
give what one process holding the whole batch gives (outputs, running statistics, weight gradients)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from invprop import distributed
from invprop.jobs.spawn import spawn_ranks
from invprop.models.sync_bn import GlobalBatchNorm2d, convert_sync_batchnorm

pytestmark = pytest.mark.timeout(120)


def _batch() -> torch.Tensor:
    return torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1


def _model() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    for bn in (net[1], net[4]):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return net


def _worker(rank: int, world: int, out_dir: str) -> None:
    distributed.init(distributed.read_env(), timeout_s=60)
    net = convert_sync_batchnorm(_model(), torch.device("cpu"))
    assert isinstance(net[1], GlobalBatchNorm2d)
    half = _batch().chunk(world)[rank]
    out = net(half)
    out.square().sum().backward()  # the whole batch's loss is the sum of the ranks' parts
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    torch.save({"out": out.detach(), "state": net.state_dict(), "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    distributed.shutdown()


def test_two_ranks_equal_one_rank_holding_the_whole_batch(tmp_path) -> None:
    spawn_ranks(_worker, 2, (str(tmp_path),), timeout_s=90)
    ref = _model()
    out = ref(_batch())
    out.square().sum().backward()
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), out.detach(), rtol=1e-4, atol=1e-5)
    for part in parts:
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(part["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for name, p in ref.named_parameters():
        # each rank's gradient of its part; DDP sums them (its mean over 2 ranks, times 2)
        torch.testing.assert_close(parts[0]["grads"][name] + parts[1]["grads"][name], p.grad, rtol=1e-3,
                                   atol=1e-4, msg=name)


def test_plain_batchnorm_differs_so_the_test_above_can_fail() -> None:
    whole = _model()(_batch())
    halves = torch.cat([_model()(half) for half in _batch().chunk(2)])
    assert not torch.allclose(whole, halves, atol=1e-3)
