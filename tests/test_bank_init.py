"""`method.bank_init=network`: the bank starts as the untrained network's embeddings, not random rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composed import compose_config

from invprop.collectives import Comm
from invprop.config import ConfigError, validate
from invprop.data import normalization
from invprop.data.augment import eval_transform
from invprop.train.trainer import Trainer

pytestmark = pytest.mark.timeout(120)
BASE = ["data=synthetic", "data.n_train=100", "train.batch_size=32", "train.num_workers=0", "method.n_pos=5"]


def _cfg(*overrides: str):
    return compose_config(*BASE, *overrides)


def test_network_init_fills_every_row_with_the_untrained_embedding(tmp_path: Path) -> None:
    trainer = Trainer(_cfg("method.bank_init=network", "deterministic=true"), Comm(), tmp_path)
    random_rows = trainer.bank.rows.clone()
    buffers = {k: v.clone() for k, v in trainer.model.named_buffers()}
    trainer.fill_bank_from_network()

    # Reference written plainly: train-mode forward of each batch of clean images, L2-normalised.
    model = trainer.model
    for k, v in model.named_buffers():  # the fill restored the running statistics: same starting network
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    mean, std = normalization(trainer.cfg.data)
    model.train()
    with torch.no_grad():
        expected = torch.cat([torch.nn.functional.normalize(model(eval_transform(trainer.images[lo:lo + 32],
                                                                                  mean, std)), dim=1)
                              for lo in range(0, 100, 32)])
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    torch.testing.assert_close(trainer.bank.rows, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(trainer.bank.rows.norm(dim=1), torch.ones(100), atol=1e-5)
    assert not torch.allclose(trainer.bank.rows, random_rows)


def test_bad_bank_init_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"method\.bank_init"):
        validate(_cfg("method.bank_init=zeros"))
