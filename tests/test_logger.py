"""TensorBoard logging mirrors metrics.jsonl exactly, and a resumed run continues its curves without repeats."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from invprop.logger import TensorBoardLogger, record_scalars, tile
from invprop.metrics import MetricsLog, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve as TensorBoard shows it (all points kept, restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as curves: per key, (step, value) in file order; a key's repeat at the same step (the
    end-of-epoch kNN line repeats `epoch`) counts once."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in read_jsonl(path):
        for key, value in record_scalars(record).items():
            if not curves[key] or curves[key][-1][0] < record["step"]:
                curves[key].append((record["step"], value))
    return dict(curves)


def assert_same_curves(tb: dict, jsonl: dict) -> None:
    import numpy as np

    assert sorted(tb) == sorted(jsonl)
    for tag, points in jsonl.items():
        steps = [s for s, _ in tb[tag]]
        assert steps == [s for s, _ in points], tag
        assert len(set(steps)) == len(steps), f"{tag}: a step appears twice"
        # event files store float32
        np.testing.assert_allclose([v for _, v in tb[tag]], [v for _, v in points], rtol=1e-6, err_msg=tag)


def test_mirror_equals_jsonl_across_a_resume(tmp_path: Path) -> None:
    """Steps 0..10 written, the run resumes from step 4 with other values: TensorBoard shows 0..4 of the
    first process and 5..8 of the second, as metrics.jsonl does."""
    path, tb_dir = tmp_path / "metrics.jsonl", tmp_path / "tb"
    first = MetricsLog(path, mirror=TensorBoardLogger(tb_dir))
    for step in range(11):
        first.write({"step": step, "epoch": step / 4, "loss": 10.0 - step, "lr": 0.1, "time": 1000.0 + step})
        if step % 4 == 0:  # an end-of-epoch kNN line at the same step, repeating `epoch`
            first.write({"step": step, "epoch": step / 4, "epoch_knn_top1": 0.1 * step, "time": 1000.0 + step})
    first.mirror.close()

    second = MetricsLog(path, mirror=TensorBoardLogger(tb_dir))
    second.truncate_after(4)
    for step in range(5, 9):
        second.write({"step": step, "epoch": step / 4, "loss": 100.0 + step, "lr": 0.2, "time": 2000.0 + step})
    second.write({"step": 8, "epoch": 2.0, "epoch_knn_top1": 0.9, "time": 2008.0})
    second.mirror.close()

    tb = tb_scalars(tb_dir)
    assert_same_curves(tb, jsonl_curves(path))
    assert tb["loss"] == [(s, 10.0 - s) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 9)]
    assert [s for s, _ in tb["epoch_knn_top1"]] == [0, 4, 8] and tb["epoch_knn_top1"][-1][1] == pytest.approx(0.9)
    assert len(list(tb_dir.glob("events.out.tfevents.*"))) == 2  # one file per process, the stale steps hidden


SMALL = ["data=synthetic", "data.n_train=192", "data.n_test=64", "train.batch_size=48", "train.epochs=2",
         "deterministic=true", "train.num_workers=0", "train.log_every=1", "method.warmup_epochs=1",
         "method.n_pos=10", "eval.every_epochs=1", "eval.knn_k=20", "eval.untrained_baseline=false",
         "train.checkpoint_every_steps=2", "train.keep_checkpoints=10"]


def _launch(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/submit.py"), *SMALL, *overrides, f"out_dir={run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_run_with_resume_logs_what_metrics_jsonl_holds(tmp_path: Path) -> None:
    """A real run (8 steps, kNN each epoch, a checkpoint every 2 steps) whose newer checkpoints are lost,
    so the rerun resumes from step 2 with another lr: the event files equal the final metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = _launch(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for lost in ("step_4", "step_6", "step_8"):  # as if the job died right after step 2's checkpoint
        shutil.rmtree(run / "checkpoints" / lost)
    proc = _launch(run, "train.lr=0.06")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step 2)" in proc.stderr

    tb = tb_scalars(run / "tb")
    jsonl = jsonl_curves(run / "metrics.jsonl")
    assert_same_curves(tb, jsonl)
    assert [s for s, _ in tb["loss"]] == list(range(1, 9))
    assert [s for s, _ in tb["epoch_knn_top1"]] == [0, 4, 8]
    assert {"loss", "lr", "img_s", "own_in_top_m", "hp_purity", "graph_purity", "epoch_knn_backbone_top1"} <= set(tb)
    lrs = dict(tb["lr"])  # base lr 0.03 * 48/128 before the resume, 0.06 * 48/128 after (cosine-scaled)
    assert lrs[1] == pytest.approx(0.01125) and lrs[3] > 0.015

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    views = acc.Images("augmented_views")
    assert [v.step for v in views] == [0] and (views[0].width, views[0].height) == (8 * 34 + 2, 4 * 34 + 2)
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method:" in config_text and "lr: 0.03" in config_text  # the fresh run's config
    assert json.loads((run / "results.json").read_text())["steps"] == 8


def wandb_history(run_dir: Path) -> list[list[dict[str, float]]]:
    """Per offline wandb run file (one per process, in order), its history rows' numeric values.

    The .wandb file is a LevelDB-style log (7-byte ':W&B' header, 32 KiB blocks of checksum, length, type,
    payload) of wandb's Record protobufs; this wandb version ships no reader of its own.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    files = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, payload, rows = path.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (kind == 0 and length == 0):  # block trailer or padding
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            payload = chunk if kind in (1, 2) else payload + chunk  # full/first start a record
            if kind in (1, 4):  # full/last end one
                record = pb.Record()
                record.ParseFromString(payload)
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    rows.append({k: float(v) for k, v in items.items()
                                 if isinstance(v, (int, float)) and "/" not in k  # not media metadata
                                 and (k == "_step" or not k.startswith("_"))})
        files.append(rows)
    return files


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="logger=wandb is optional; wandb not installed")
def test_wandb_offline_rows_are_the_jsonl_lines(tmp_path: Path, monkeypatch) -> None:
    """One wandb row per step holding every line of that step; a resumed process starts after the checkpoint."""
    import torch
    from omegaconf import OmegaConf

    from invprop.logger import build_logger

    monkeypatch.setenv("WANDB_SILENT", "true")
    path = tmp_path / "metrics.jsonl"
    cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "test", "views": 32}, "seed": 0})
    logger = build_logger(cfg, tmp_path)
    log = MetricsLog(path, mirror=logger)
    logger.image("augmented_views", torch.rand(3, 10, 20), 0)
    for step in range(7):
        log.write({"step": step, "loss": 10.0 - step, "time": 0.0})
        if step == 4:
            log.write({"step": step, "epoch_knn_top1": 0.5, "time": 0.0})
    logger.close()
    resumed = build_logger(cfg, tmp_path)
    log = MetricsLog(path, mirror=resumed)
    log.truncate_after(3)
    for step in range(4, 7):
        log.write({"step": step, "loss": 100.0 + step, "time": 0.0})
    resumed.close()
    import wandb

    wandb.teardown()  # finish() leaves the last file's tail to wandb's service; a process exit would flush it

    first, second = wandb_history(tmp_path)
    assert first[0]["_step"] == 0 and (tmp_path / "wandb").is_dir()
    assert first == [{"_step": s, "loss": 10.0 - s, **({"epoch_knn_top1": 0.5} if s == 4 else {})} for s in range(7)]
    assert second == [{"_step": s, "loss": 100.0 + s} for s in range(4, 7)]


@pytest.mark.parametrize(("n", "channels"), [(32, 3), (5, 3), (9, 1), (2, 3)])
def test_tile_lays_views_out_as_torchvisions_make_grid(n: int, channels: int) -> None:
    from torchvision.utils import make_grid

    images = torch.rand(n, channels, 6, 7, generator=torch.Generator().manual_seed(n))
    assert torch.equal(tile(images, per_row=8, gap=2, fill=1.0), make_grid(images, nrow=8, padding=2, pad_value=1.0))
