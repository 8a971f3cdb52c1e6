"""The trained evaluations' training crops through FFCV (data.format=ffcv on an image folder,
invprop/eval/crops.py): the online linear probe stopped and resumed equals the uninterrupted one bit for bit and
crops every step as it did, two gloo ranks agree with one, semisup resumes the same way and scores its test split
through the centre-crop reader, the crops are the boxes invprop.data.crop draws for (seed, epoch, row), and
images in memory keep the PIL/tensor path.

Every rank is a forked process (invprop.testing.forked_ranks): FFCV's threads never enter the test process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

from composed import compose_config  # noqa: E402
from datafiles import write_image_folder  # noqa: E402

from invprop import distributed  # noqa: E402
from invprop.collectives import Comm  # noqa: E402
from invprop.config import typed  # noqa: E402
from invprop.config.schema import Config  # noqa: E402
from invprop.data import beton_cache, eval_split, load_split  # noqa: E402
from invprop.data.order import EpochOrder  # noqa: E402
from invprop.eval.crops import FFCVCrops  # noqa: E402
from invprop.eval.linear_world import linear_eval  # noqa: E402
from invprop.eval.readers import EvalReader  # noqa: E402
from invprop.eval.semisup_world import semisup_world  # noqa: E402
from invprop.models import build_model  # noqa: E402
from invprop.testing.forked_ranks import run_forked  # noqa: E402

N_TRAIN, N_VAL = 3 * 20, 3 * 8
STOP = 4  # online probe: 48 training rows (12 held out), 3 batches of 16 per epoch, 9 steps


def _config(folder: Path, betons: Path, *extra: str) -> Config:
    return typed(compose_config("data=folder", f"data.root={folder}", "data.image_size=32",
                                "data.beton_max_resolution=64", f"data.beton_dir={betons}", "data.eval_workers=1",
                                "model=resnet_tiny", "eval.batch_size=16", "eval.linear.mode=online",
                                "eval.linear.epochs=3", "eval.linear.batch_size=16", "eval.linear.lrs=[0.1,0.5]",
                                "eval.linear.val_fraction=0.2", "eval.semisup.fractions=[0.5]",
                                "eval.semisup.epochs=2", "eval.semisup.milestones=[1]",
                                "eval.semisup.milestones_epochs=2", "eval.semisup.batch_size=10", *extra))


class RecordingReader(EvalReader):
    """EvalReader that notes which crop source each crops() call built (None: the PIL/tensor path)."""

    sources: list[str | None]

    def crops(self, *args, **kwargs):
        source = super().crops(*args, **kwargs)
        self.sources = [*getattr(self, "sources", []), None if source is None else type(source).__name__]
        return source


def _eval_rank(rank: int, world: int, cfg: Config, protocol: str, root: Path, stop: int | None) -> dict:
    """`protocol` (linear | semisup) through the FFCV reader on this rank; its results and the crops it read."""
    comm = distributed.init(distributed.read_env(), 60.0)
    try:
        cfg.eval.stop_at_step = stop
        torch.manual_seed(0)  # the same network on every rank and in every run
        model = build_model(cfg.model).eval()
        train, test = load_split(cfg.data, "train"), load_split(cfg.data, eval_split(cfg.data))
        reader = RecordingReader(cfg.data, comm, "ffcv")
        calls: list = []
        _wrap_calls(calls)
        if protocol == "linear":
            found = linear_eval(cfg, model, comm, train, test, root=root / "linear", reader=reader)
        else:
            found = semisup_world(cfg, model, comm, root, train, test, root / "semisup", reader=reader)
        return {"results": found, "sources": reader.sources, "steps": calls}
    finally:
        distributed.shutdown()


def _wrap_calls(calls: list) -> None:
    """Note every FFCVCrops step of this process: (epoch, batch, rows, digest of the crops' pixels)."""
    read = FFCVCrops.__call__

    def noted(self: FFCVCrops, epoch: int, b: int, rows: torch.Tensor) -> torch.Tensor:
        out = read(self, epoch, b, rows)
        calls.append((epoch, b, rows.tolist(), hashlib.sha1(out.numpy().tobytes()).hexdigest()))
        return out

    FFCVCrops.__call__ = noted  # a forked rank's own copy of the class: the test process never sees it


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Config]:
    tmp = tmp_path_factory.mktemp("evalcrops")
    folder = write_image_folder(tmp / "images", classes=3, per_class=(20, 8), sizes=(40, 120))
    return tmp, _config(folder, tmp / "betons")


@pytest.fixture(scope="module")
def online(setup) -> dict:
    """The online probe through FFCV: whole (W=1), stopped at STOP and resumed (W=1), whole on W=2."""
    tmp, cfg = setup
    run = lambda name, world, stop: run_forked(_eval_rank, world, (cfg, "linear", tmp / name, stop),  # noqa: E731
                                               timeout_s=400)
    return {"whole": run("whole", 1, None)[0], "stopped": run("resume", 1, STOP)[0],
            "resumed": run("resume", 1, None)[0], "two": run("two", 2, None)}


def test_online_probe_reads_its_crops_through_ffcv(online) -> None:
    whole = online["whole"]
    assert whole["sources"] == ["FFCVCrops"]
    # 3 epochs x 3 batches of 16 rows, each the order's rows (FFCVCrops refuses others), none of them held out
    assert [(e, b) for e, b, _, _ in whole["steps"]] == [(e, b) for e in range(3) for b in range(3)]
    assert all(len(rows) == 16 for _, _, rows, _ in whole["steps"])
    assert len({r for _, _, rows, _ in whole["steps"][:3] for r in rows}) == 48


def test_online_probe_stopped_and_resumed_equals_uninterrupted(online) -> None:
    whole, stopped, resumed = online["whole"], online["stopped"], online["resumed"]
    assert stopped["results"] == {"preempted_at_step": STOP}
    assert stopped["steps"] == whole["steps"][:STOP]
    # the resumed probe starts FFCV at epoch 1, batch 1 and reads the very crops the uninterrupted one read
    assert resumed["steps"] == whole["steps"][STOP:]
    assert resumed["results"]["linear_head_digest"] == whole["results"]["linear_head_digest"]
    assert resumed["results"]["linear_top1"] == whole["results"]["linear_top1"]


def test_online_probe_two_ranks_agree_with_one(online) -> None:
    whole, (first, second) = online["whole"], online["two"]
    for key in ("linear_top1", "linear_top5", "linear_val_top1", "linear_lr"):
        assert first["results"][key] == second["results"][key], key
    assert abs(first["results"]["linear_top1"] - whole["results"]["linear_top1"]) <= 0.001
    # each rank read its half of every global batch: together the one rank's rows, crops keyed by the row alone
    for one, a, b in zip(whole["steps"], first["steps"], second["steps"], strict=True):
        assert one[:2] == a[:2] == b[:2] and one[2] == a[2] + b[2]


def test_semisup_through_ffcv_resumes_to_the_uninterrupted_net(setup) -> None:
    tmp, cfg = setup
    whole = run_forked(_eval_rank, 1, (cfg, "semisup", tmp / "semi_whole", None), timeout_s=400)[0]
    stopped = run_forked(_eval_rank, 1, (cfg, "semisup", tmp / "semi_resume", 3), timeout_s=400)[0]
    resumed = run_forked(_eval_rank, 1, (cfg, "semisup", tmp / "semi_resume", None), timeout_s=400)[0]
    assert whole["sources"] == ["FFCVCrops"] and stopped["results"] == {"preempted_at_step": 3}
    assert len(whole["steps"]) == 2 * 3  # 30 labelled images, batches of 10, 2 epochs
    assert resumed["steps"] == whole["steps"][3:]
    assert resumed["results"]["semisup_50pct_digest"] == whole["results"]["semisup_50pct_digest"]
    assert resumed["results"]["semisup_50pct_top1"] == whole["results"]["semisup_50pct_top1"]


def _boxes_rank(rank: int, world: int, cfg: Config, betons: Path) -> dict:
    """Crops of steps (1, 2) through a fresh FFCVCrops (a resumed position) and one that read (1, 0) first,
    with the stored images they came from."""
    from invprop.data.folder import decode

    train_images, _ = load_split(cfg.data, "train")
    beton = beton_cache.ensure_beton(cfg.data, "train", betons, progress=False)
    rows = torch.arange(10, N_TRAIN)  # positions p read row p + 10
    order = EpochOrder(len(rows), 10, seed=3)
    make = lambda: FFCVCrops(beton, order, rows, N_TRAIN, 0, 1, 1, 32, 7, (0.08, 1.0), True)  # noqa: E731
    fresh, running = make(), make()
    try:
        running(1, 0, rows[order.local_indices(1, 0, 0, 1)])
        want = rows[order.local_indices(1, 2, 0, 1)]
        crops = fresh(1, 2, want)
        again = running(1, 2, want)  # not the next batch: the pass restarts at (1, 2)
        with pytest.raises(ValueError, match="FFCV read rows"):
            fresh(1, 3, want)  # the order's rows of (1, 3) are others
    finally:
        fresh.close()
        running.close()
    stored = [decode(str(train_images.paths[int(r)]), cfg.data.beton_max_resolution) for r in want]
    return {"rows": want, "crops": crops, "again": again, "stored": stored}


def test_ffcv_crops_are_the_seeded_boxes_of_their_rows(setup) -> None:
    import cv2

    from invprop.data.crop import sample_crop

    tmp, cfg = setup
    got = run_forked(_boxes_rank, 1, (cfg, tmp / "betons"), timeout_s=300)[0]
    assert torch.equal(got["crops"], got["again"])  # the same crops however the pass got to (1, 2)

    def expected(j: int, epoch: int) -> np.ndarray:
        img = got["stored"][j]
        top, left, h, w, flip = sample_crop(7, epoch, int(got["rows"][j]), img.shape[0], img.shape[1],
                                            scale=(0.08, 1.0))
        out = cv2.resize(np.ascontiguousarray(img[top : top + h, left : left + w]), (32, 32),
                         interpolation=cv2.INTER_AREA)
        return out[:, ::-1] if flip else out

    for j in range(len(got["rows"])):
        crop = got["crops"][j].permute(1, 2, 0).numpy().astype(int)
        near = np.abs(crop - expected(j, 1)).mean()  # the stored JPEG is re-encoded: a few levels apart
        other = np.abs(crop - expected(j, 2)).mean()  # the box another epoch draws
        assert near < 6 and near < other / 2, (j, near, other)


def test_images_in_memory_keep_the_pil_path() -> None:
    cfg = typed(compose_config("data=synthetic", "data.n_train=40", "data.n_test=20"))
    comm = Comm()
    images, _ = load_split(cfg.data, "train")
    for name in ("memory", "ffcv"):  # images in memory never go through a .beton, whatever the reader
        reader = EvalReader(cfg.data, comm, name)
        assert reader.crops(images, "train", EpochOrder(40, 8, 0), torch.arange(40), 0, (0.08, 1.0), True) is None
    assert EvalReader.for_config(cfg.data, comm, lazy=False).name == "memory"
