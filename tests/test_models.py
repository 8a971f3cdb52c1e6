"""Backbones, heads and build_model (invprop.models)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from invprop.config import group_section
from invprop.models import EmbeddingModel, LinearHead, MLPHead, build_head, build_model


def _section(keys: dict):
    """The model option named by `arch` (configs/model/), with `keys` on top."""
    return group_section("model", "resnet_tiny" if keys["arch"] == "vit_b" else keys["arch"], **keys)


def _x(b=4, s=32, seed=0):
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "arch,feat,backbone_params",
    [("resnet_tiny", 128, 307_536), ("resnet18_cifar", 512, 11_168_832), ("resnet50", 2048, 23_508_032)],
)
def test_backbone_sizes_and_unit_embeddings(arch, feat, backbone_params):
    torch.manual_seed(0)
    m = build_model(_section({"arch": arch, "head": "linear", "embedding_dim": 128, "hidden_dim": None}))
    assert isinstance(m, EmbeddingModel) and m.feature_dim == feat and m.embedding_dim == 128
    assert _nparams(m.backbone) == backbone_params
    m.eval()
    x = _x(2 if arch != "resnet_tiny" else 4)
    with torch.no_grad():
        z = m(x)
        f = m.features(x)
    assert z.shape == (x.shape[0], 128) and f.shape == (x.shape[0], feat)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z, torch.nn.functional.normalize(m.head.fc(f), dim=1))


def test_cifar_stem_keeps_resolution():
    # 3x3 stride-1 stem and no max-pool: a 32px input reaches layer4 at 4x4 (ImageNet stem would give 1x1).
    m = build_model(_section({"arch": "resnet18_cifar"}))
    assert m.backbone.conv1.kernel_size == (3, 3) and m.backbone.conv1.stride == (1, 1)
    assert not any(isinstance(mod, torch.nn.MaxPool2d) for mod in m.modules())
    shapes = {}

    def record(name):
        def hook(mod, inputs, output) -> None:  # returns None: the output is left unchanged
            shapes[name] = tuple(output.shape)

        return hook

    m.backbone.layer4.register_forward_hook(record("l4"))
    m.backbone.layer1.register_forward_hook(record("l1"))
    m.eval()
    with torch.no_grad():
        m(_x(2))
    assert shapes == {"l1": (2, 64, 32, 32), "l4": (2, 512, 4, 4)}


def test_resnet18_cifar_keys_follow_torchvision():
    ours = build_model(_section({"arch": "resnet18_cifar"})).backbone.state_dict()
    tv = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(tv)
    diff = [k for k in tv if ours[k].shape != tv[k].shape]
    assert diff == ["conv1.weight"]  # only the stem differs: (64, 3, 3, 3) vs (64, 3, 7, 7)


def test_resnet50_backbone_keys_match_torchvision_minus_fc():
    m = build_model(_section({"arch": "resnet50", "head": "mlp"}))
    ours = m.backbone.state_dict()
    tv_model = torchvision.models.resnet50(weights=None)
    tv = {k: v for k, v in tv_model.state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(tv)
    assert all(ours[k].shape == tv[k].shape for k in tv)
    # Exportable as is: the backbone's weights load strictly into a torchvision ResNet-50 without fc.
    tv_model.fc = torch.nn.Identity()
    tv_model.load_state_dict(ours, strict=True)


def test_heads():
    assert isinstance(build_head("linear", 64, 16), LinearHead)
    mlp = build_model(_section({"arch": "resnet_tiny", "head": "mlp", "embedding_dim": 32, "hidden_dim": 256})).head
    assert isinstance(mlp, MLPHead)
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (128, 256, 32)
    default_hidden = build_model(_section({"arch": "resnet_tiny", "head": "mlp"})).head
    assert (default_hidden.fc1.out_features, default_hidden.fc2.out_features) == (128, 128)
    z = mlp(torch.randn(5, 128))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        build_head("transformer", 8, 8)
    with pytest.raises(ValueError):
        build_model(_section({"arch": "vit_b"}))


def test_gradients_reach_the_stem_and_train_mode_is_deterministic():
    torch.manual_seed(0)
    a = build_model(_section({"arch": "resnet_tiny"}))
    torch.manual_seed(0)
    b = build_model(_section({"arch": "resnet_tiny"}))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # construction uses only torch's seeded RNG
    x = _x(8)
    loss = (a(x) * torch.linspace(-1, 1, 128)).sum()
    loss.backward()
    assert a.backbone.conv1.weight.grad is not None and a.backbone.conv1.weight.grad.abs().sum() > 0
    assert a.head.fc.weight.grad.abs().sum() > 0



def test_deterministic_mode_fixes_the_cublas_workspace(monkeypatch):
    """Without CUBLAS_WORKSPACE_CONFIG every cuBLAS call raises under torch.use_deterministic_algorithms on a GPU."""
    import os

    from invprop.train.trainer import seed_everything

    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so the teardown restores the caller's value
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        seed_everything(0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.backends.cudnn.benchmark is False
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own choice is kept
        seed_everything(0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        seed_everything(0, deterministic=False)
        assert torch.backends.cudnn.benchmark is True  # fixed batch shapes: cuDNN's autotuner pays off
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
