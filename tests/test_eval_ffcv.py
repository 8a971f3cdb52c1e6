"""Evaluation features through FFCV (data.format=ffcv on an image folder): the kNN read through each split's
.beton agrees with the PIL path, W=2 gloo ranks give what one rank gives, and the .beton is checked by rank 0
alone (invprop.data.beton_cache.CHECKS counts each rank's stats and checks).

Every rank, the single one included, is a forked process (invprop.testing.forked_ranks): FFCV's loader threads
and numba state never enter the test process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("ffcv")
pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

from composed import compose_config  # noqa: E402
from datafiles import write_image_folder  # noqa: E402

from invprop import distributed  # noqa: E402
from invprop.bank import ShardedBank  # noqa: E402
from invprop.config import typed  # noqa: E402
from invprop.config.schema import Config  # noqa: E402
from invprop.data import beton_cache, eval_split, load_split  # noqa: E402
from invprop.data.order import shard_bounds  # noqa: E402
from invprop.eval.features import embed_and_pool  # noqa: E402
from invprop.eval.knn_eval import evaluate_knn_world  # noqa: E402
from invprop.eval.linear_world import linear_eval  # noqa: E402
from invprop.eval.readers import EvalReader  # noqa: E402
from invprop.models import build_model  # noqa: E402
from invprop.testing.forked_ranks import run_forked  # noqa: E402

KNN_KEYS = ("knn_top1", "knn_backbone_top1", "knn_bank_top1")
N_TRAIN, N_VAL = 3 * 20, 3 * 8


def _config(folder: Path, betons: Path) -> Config:
    return typed(compose_config("data=folder", f"data.root={folder}", "data.image_size=32",
                                "data.beton_max_resolution=64", f"data.beton_dir={betons}", "data.eval_workers=1",
                                "model=resnet_tiny", "eval.batch_size=16", "eval.knn_k=5", "eval.linear.mode=features",
                                "eval.linear.epochs=3", "eval.linear.batch_size=20", "eval.linear.lrs=[0.1]",
                                "eval.linear.val_fraction=0", "eval.linear.aug_views=0"))


def _knn_rank(rank: int, world: int, cfg: Config, reader_name: str) -> dict:
    """kNN and the features-mode linear probe over the evaluation world through `reader_name`, this rank's
    pooled test features, and the .beton work this rank did."""
    comm = distributed.init(distributed.read_env(), 60.0)
    try:
        beton_cache.CHECKS.reset()
        torch.manual_seed(0)  # the same network on every rank and in every run
        model = build_model(cfg.model).eval()
        train, test = load_split(cfg.data, "train"), load_split(cfg.data, eval_split(cfg.data))
        bank = ShardedBank(len(train[1]), cfg.model.embedding_dim, comm=comm, seed=0)
        reader = EvalReader(cfg.data, comm, reader_name)
        found = evaluate_knn_world(cfg, model, bank, train, test, reader=reader)
        lo, hi = shard_bounds(len(test[1]), comm.rank, comm.world)
        _, pooled = embed_and_pool(model, reader.rows(test[0], eval_split(cfg.data), lo, hi), cfg.data,
                                   comm.device, 16)
        checks = beton_cache.CHECKS
        # features mode: both passes through a reader of its own, as the evaluation job builds one per protocol
        probe = linear_eval(cfg, model, comm, train, test, reader=EvalReader(cfg.data, comm, reader_name))
        return {**{k: found[k] for k in KNN_KEYS}, "pooled": pooled, "stats": checks.stats,
                "checks": checks.checks, "linear_top1": probe["linear_top1"], "linear_top5": probe["linear_top5"]}
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """The same kNN through PIL (one rank), FFCV (one rank, writing both betons) and FFCV (two ranks)."""
    tmp = tmp_path_factory.mktemp("evalffcv")
    folder = write_image_folder(tmp / "images", classes=3, per_class=(20, 8), sizes=(40, 120))
    cfg = _config(folder, tmp / "betons")
    return {"pil": run_forked(_knn_rank, 1, (cfg, "pil"), timeout_s=300),
            "ffcv": run_forked(_knn_rank, 1, (cfg, "ffcv"), timeout_s=300),
            "ffcv2": run_forked(_knn_rank, 2, (cfg, "ffcv"), timeout_s=300)}


def test_ffcv_features_match_the_pil_path(runs) -> None:
    # The two paths resize differently (FFCV: the stored JPEG re-encoded at quality 90, area interpolation; PIL:
    # the source file, antialiased bilinear), so pixels differ by a few levels; the features may not.
    pil, ffcv = runs["pil"][0]["pooled"], runs["ffcv"][0]["pooled"]
    assert pil.shape == ffcv.shape == (N_VAL, pil.shape[1])
    cosine = F.cosine_similarity(pil, ffcv, dim=1)
    assert cosine.min().item() > 0.99, cosine
    for key in KNN_KEYS:
        assert abs(runs["ffcv"][0][key] - runs["pil"][0][key]) <= 1.5 / N_VAL, key  # one query in 24


def test_two_ranks_through_ffcv_equal_one_rank(runs) -> None:
    one, two = runs["ffcv"][0], runs["ffcv2"]
    for key in KNN_KEYS:
        assert two[0][key] == two[1][key] == one[key], key
    assert torch.equal(torch.cat([two[0]["pooled"], two[1]["pooled"]]), one["pooled"])


def test_only_rank_zero_checks_the_betons(runs) -> None:
    one, (first, second) = runs["ffcv"][0], runs["ffcv2"]
    # each of the two splits' betons: every source file stat-ed once per process (kNN's reader and the probe's
    # share the check), by rank 0 only (one run wrote them, the other checked them)
    assert one["stats"] == first["stats"] == N_TRAIN + N_VAL
    assert one["checks"] == 0 and first["checks"] == 2 and second["stats"] == second["checks"] == 0


def test_linear_probe_through_ffcv_matches_pil_and_one_rank(runs) -> None:
    pil, one, two = runs["pil"][0], runs["ffcv"][0], runs["ffcv2"]
    for key in ("linear_top1", "linear_top5"):
        assert two[0][key] == two[1][key], key
        assert abs(two[0][key] - one[key]) <= 0.001, key  # gradients summed over 2 ranks: float order only
        assert abs(one[key] - pil[key]) <= 1.5 / N_VAL, key
