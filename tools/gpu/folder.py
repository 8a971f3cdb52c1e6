"""The GPU check's folder part (issue 16): InvP training fed end to end by an ImageNet-style folder's training
loader, on a folder of JPEGs generated on the machine itself (a GPU machine may hold no dataset, and FFCV may
not build there: then the trainer's torchvision fallback is what gets measured, and the JSON says so)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[2]


def compose_config(groups: dict[str, str]) -> DictConfig:
    """configs/config.yaml with the named group options (invprop.config.compose_defaults)."""
    from invprop.config import compose_defaults

    return compose_defaults(groups)


def loader_choice() -> tuple[str, str]:
    """Which loader the trainer builds for `data.format=ffcv`, and why (the trainer falls back the same way)."""
    try:
        import ffcv  # noqa: F401
    except ImportError as exc:
        return "torchvision", f"FFCV is not importable ({exc}): the trainer's torchvision fallback"
    return "ffcv", "FFCV imports: data.format=ffcv, as data=imagenet trains"


def folder_config(root: Path, work: Path, arch: str, image_size: int, batch: int, workers: int,
                  device: torch.device) -> DictConfig:
    """`data=imagenet` on the generated folder (its own crop, flip and colour recipe), InvP at full strength
    from the first step (no warm-up epochs), the precision and layout the GPU check's other steps use."""
    cfg = compose_config({"data": "imagenet", "model": arch, "method": "invp", "cluster": "local"})
    cfg.logger = {"name": "none"}
    cfg.data.update(root=str(root), image_size=image_size, format="ffcv", beton_dir=str(work / "betons"))
    cfg.train.update(epochs=100, batch_size=batch, num_workers=workers, checkpoint_every_min=0,
                     precision="bf16" if device.type == "cuda" else "fp32", channels_last=True)
    cfg.method.warmup_epochs = 0
    cfg.eval.every_epochs = 0
    cfg.out_dir = str(work / "run")
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _epoch(trainer: Any, epoch: int, train: bool) -> tuple[int, int, float, float, tuple]:
    """One epoch as `Trainer.fit` runs it (loader -> device -> colour augment -> step); images, steps,
    seconds, seconds until the first batch came (a fresh epoch's loader start), and that first batch."""
    trainer.position.epoch, trainer.position.batch = epoch, 0
    images = steps = 0
    start = time.perf_counter()
    first, kept = None, ()
    for x, labels, indices in trainer.batches():
        if first is None:
            first, kept = time.perf_counter() - start, (x, labels, indices)
        if train:
            trainer.train_step(x, indices)
            trainer.state.step += 1
        trainer.position.batch += 1
        images, steps = images + int(x.shape[0]), steps + 1
    _sync(trainer.device)
    return images, steps, time.perf_counter() - start, first or 0.0, kept


def folder_pipeline(device: torch.device, n_images: int, image_size: int, batch: int, arch: str, workers: int,
                    epochs: int, side: tuple[int, int], in_memory: dict | None) -> dict:
    """img/s of InvP training on `n_images` generated JPEGs (`side`: their range of side lengths) through
    the trainer's own loader, over `epochs` whole epochs after a warm-up one (compilation, cuDNN's autotuner,
    the bank's `auto`), next to the same trainer step on one batch held in memory and to the in-memory step
    of `step_resnet50_224` (`in_memory`, when it ran). `loader_only_img_s`: one epoch drained without a step,
    so a low ratio says whether the loader or the device is the limit."""
    from bench_loader import write_folder

    from invprop.collectives import Comm
    from invprop.train.trainer import Trainer

    loader, why = loader_choice()
    with tempfile.TemporaryDirectory(prefix="gpu_check_folder_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        root = write_folder(work / "folder", n_images, side=side)
        generate_s = time.perf_counter() - start
        cfg = folder_config(root, work, arch, image_size, batch, workers, device)
        start = time.perf_counter()
        trainer = Trainer(cfg, Comm(device=device), work / "run")  # FFCV: writes the .beton here
        build_s = time.perf_counter() - start
        built = trainer.source.name  # the loader the trainer runs: ffcv or torchvision
        try:
            warmup_s = _epoch(trainer, 0, train=True)[2]
            drained, _, drain_s, _, _ = _epoch(trainer, 1, train=False)
            images = steps = 0
            seconds, firsts = 0.0, []
            for epoch in range(2, 2 + epochs):
                n, s, dt, first, kept = _epoch(trainer, epoch, train=True)
                images, steps, seconds = images + n, steps + s, seconds + dt
                firsts.append(first)
            fixed_s = _fixed_batch(trainer, kept, steps)
        finally:
            trainer.close()
            if built == "ffcv":
                trainer.source.loader.close()
    img_s = images / seconds
    fixed_img_s = steps * batch / fixed_s
    reference = (in_memory or {}).get("invp_img_s_pipelined")
    return {"loader": built, "loader_why": why if built == loader else f"the trainer built {built}",
            "arch": arch, "size": image_size, "batch": batch, "workers": workers, "images_in_folder": trainer.n,
            "bank_rows": trainer.n, "bank_selection": trainer.bank.tuned or trainer.bank.selection,
            "epochs": epochs, "steps": steps, "images": images, "seconds": seconds, "img_s": img_s,
            "epoch_start_s": sorted(firsts)[len(firsts) // 2], "generate_s": generate_s, "build_s": build_s,
            "warmup_epoch_s": warmup_s, "loader_only_img_s": drained / drain_s,
            "fixed_batch_img_s": fixed_img_s, "ratio_to_fixed_batch": img_s / fixed_img_s,
            "in_memory_invp_img_s": reference,
            "ratio_to_in_memory": None if reference is None else img_s / reference}


def _fixed_batch(trainer: Any, batch: tuple, steps: int) -> float:
    """Seconds for `steps` trainer steps back to back on one loader batch kept in (pinned) host memory: the
    same step with no loader behind it."""
    x, labels, indices = batch
    if trainer.device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    trainer.train_step(x, indices)
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, indices)
    _sync(trainer.device)
    return time.perf_counter() - start


def default_workers(dry: bool) -> int:
    """Loader workers: the machine's cores up to 16 (2 in a dry run, the test machine's count)."""
    return 2 if dry else min(16, len(os.sched_getaffinity(0)))
