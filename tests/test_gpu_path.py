"""The GPU switches (bf16 autocast, channels_last, torch.compile) exercised on the CPU as far as PyTorch allows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from invprop.collectives import Comm
from invprop.train.trainer import Trainer, window_means

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        invp_only = [] if "method=npid" in overrides else ["method.n_pos=5"]
        cfg = compose(config_name="config", overrides=["data=synthetic", "data.n_train=128", "train.batch_size=32",
                                                       "train.num_workers=0", *invp_only, *overrides])
    return Trainer(cfg, Comm(), tmp_path)


def _one_step(trainer: Trainer) -> tuple[dict, torch.Tensor]:
    images = trainer.images[:32]
    stats = window_means([trainer.train_step(images, torch.arange(32))])
    return stats, trainer.bank.rows


def test_bf16_autocast_keeps_bank_and_loss_fp32(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.precision=bf16")
    x = trainer.augment_batch(trainer.images[:8])
    z = trainer.embed(x)
    assert z.dtype == torch.float32 and torch.allclose(z.norm(dim=1), torch.ones(8), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert trainer.model.backbone(x).dtype == torch.bfloat16  # the network itself did run in bf16
    stats, bank = _one_step(trainer)
    assert bank.dtype == torch.float32 and torch.isfinite(bank).all()
    assert torch.isfinite(torch.tensor(stats["loss"])).item()
    fp32 = _trainer(tmp_path / "b")
    fp32_stats, _ = _one_step(fp32)
    assert stats["loss"] == pytest.approx(fp32_stats["loss"], rel=0.05)  # same step, bf16 rounding only


def test_channels_last_matches_contiguous(tmp_path: Path) -> None:
    a = _trainer(tmp_path / "a", "deterministic=true")
    b = _trainer(tmp_path / "b", "deterministic=true", "train.channels_last=true")
    assert b.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    sa, ba = _one_step(a)
    sb, bb = _one_step(b)
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-4)
    torch.testing.assert_close(ba, bb, rtol=1e-3, atol=1e-4)


def test_bad_precision_is_refused() -> None:
    from invprop.config import ConfigError, validate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match="^train.precision"):
        validate(cfg)


@pytest.mark.slow
def test_compiled_network_matches_eager(tmp_path: Path) -> None:
    eager = _trainer(tmp_path / "a", "deterministic=true")
    compiled = _trainer(tmp_path / "b", "deterministic=true", "train.compile=true")
    x = eager.augment_batch(eager.images[:8])
    torch.testing.assert_close(compiled.embed(x), eager.embed(x), rtol=1e-3, atol=1e-4)


def test_bank_selection_from_config_and_reported_once(tmp_path: Path, capsys) -> None:
    from invprop.train.progress import TrainProgress
    from invprop.train.trainer import bank_selection

    trainer = _trainer(tmp_path, "bank.selection=filter")
    assert trainer.bank.selection == "filter"
    stats, _ = _one_step(trainer)  # the float16 filter on the CPU, end to end
    assert torch.isfinite(torch.tensor(stats["loss"])).item()
    # auto tunes on accelerators only (a GPU cannot exist here): tune by hand, as the first GPU step would
    z = torch.nn.functional.normalize(torch.randn(32, 128), dim=1)
    trainer.bank.autotune(z, 64, repeats=1)
    with TrainProgress(10, 0) as progress:
        trainer.report_bank_selection(progress)
        trainer.report_bank_selection(progress)
    out = capsys.readouterr().out
    assert out.count("bank top-M selection") == 1 and f"selection: {trainer.bank.tuned} (topk" in out
    cfg = trainer.cfg.copy()
    cfg.bank.selection, cfg.deterministic = "auto", True
    assert bank_selection(cfg, torch.device("cuda")) == "topk"  # no timing-dependent choice when deterministic
    assert bank_selection(cfg, torch.device("cpu")) == "auto"


@pytest.mark.parametrize(("overrides", "allowed"), [
    (["bank.selection=topk"], []),
    # one read: which queries the float16 filter could not clear (M + its margin well below the 512 rows)
    (["bank.selection=filter", "data.n_train=512", "method.n_background=64"], ["nonzero"]),
    (["method=npid"], []),
])
def test_accelerator_training_step_reads_nothing_back(tmp_path: Path, overrides: list[str], allowed: list[str]
                                                      ) -> None:
    """A training step as it runs on a GPU (accelerator selection, sync-free augmentation) makes no call that
    would wait for the device: no .item(), no boolean-mask indexing, no data-dependent shapes."""
    from sync_guard import SyncGuard

    trainer = _trainer(tmp_path, *overrides)
    trainer.augment.select_rows = False
    images, ids = trainer.images[:32], torch.arange(32)
    trainer.train_step(images, ids)  # first call: lazily built state
    with SyncGuard() as guard:
        monitors = trainer.train_step(images, ids + 32)
    assert guard.syncs == allowed
    assert all(isinstance(v, (torch.Tensor, float)) for v in monitors.values())
