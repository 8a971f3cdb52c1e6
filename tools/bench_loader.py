#!/usr/bin/env python
"""Throughput of the FFCV training loader vs the plain torchvision ``DataLoader`` path, in one run, and of the
resident images (``data.format=device``) for data sets held in memory.

Both paths read the same dataset (Fashion-MNIST, 32 px, by default), produce the same kind of batch
(uint8 ``(B, 3, S, S)`` RandomResizedCrop'ed with scale 0.2-1, labels, indices), with the same order
(``EpochOrder``), batch size and worker count. Colour augmentation is not part of either loader (it runs
batched on the device) and is not timed.

Timing: the FFCV loader is built once; its first epoch (numba compilation + first reads) is the warm-up and
reported separately (``ffcv_warmup_s``); then ``--epochs`` further full epochs are timed. The torchvision
path builds a ``DataLoader`` per epoch (its workers are not persistent, as in training), so its timed epochs
include worker start-up, like real training does; its first epoch is a warm-up too (page cache, imports).

Usage::

    python tools/bench_loader.py                       # Fashion-MNIST 32 px, batch 256, 2 workers
    python tools/bench_loader.py --json                # one JSON object on stdout
    python tools/bench_loader.py --dataset synthetic --n 20000 --image-size 64
    python tools/bench_loader.py --profile             # where the FFCV time goes (cProfile + stage timings)
    python tools/bench_loader.py --dataset folder --size 224 --generate 2000   # ImageNet-like JPEG folder
    python tools/bench_loader.py --dataset folder --root /data/imagenet --n 20000 --size 224

For ``--dataset folder`` (``root/train/<class>/<image>``; ``--generate N`` writes N JPEGs of 250-500 px into a
temporary folder first) both paths flip as well, FFCV reads a jpg beton (longer side 256) and decodes with
its RandomResizedCrop JPEG decoder at the target size, torchvision decodes the files with PIL (reduced-size
JPEG draft, shrink to 256, crop, resize) in the same number of DataLoader workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_folder(root: Path, n: int, classes: int = 10, seed: int = 0, side: tuple[int, int] = (250, 500)) -> Path:
    """``root/{train,val}/<class>/<i>.jpg``: n smooth pictures (gradient, a shape, light noise) of `side`
    (default 250-500) px a side, roughly ImageNet's sizes and JPEG entropy; val gets a tenth as many."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            c = i % classes
            h, w = (int(v) for v in rng.integers(side[0], side[1] + 1, 2))
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            img = np.stack([xx / w * 200 + c * 5, yy / h * 200, (xx + yy) / (h + w) * 255 - c * 9], axis=-1)
            cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.3) * min(h, w)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
            img += rng.normal(0, 6, img.shape)
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _data_cfg(args: argparse.Namespace):
    from invprop.config import tool_data_section

    return tool_data_section(
        {
            "name": args.dataset,
            "root": args.root,
            "subset": args.n if args.dataset in ("fashion_mnist", "folder") else 0,
            "image_size": args.image_size,
            "resize_mode": args.resize_mode,
            "n_train": args.n or 20000,
            "n_test": 100,
            "num_classes": 10,
            "seed": args.seed,
            "beton_mode": args.mode,
        }
    )


def _drain(it, limit: int | None = None) -> tuple[int, int]:
    n_img = n_b = 0
    for images, _labels, _indices in it:
        n_img += int(images.shape[0])
        n_b += 1
        if limit is not None and n_b >= limit:
            break
    return n_img, n_b


def bench_ffcv(beton: Path, order, args: argparse.Namespace) -> dict:
    from invprop.data.ffcv.loader import build_ffcv_train_loader

    t0 = time.perf_counter()
    loader = build_ffcv_train_loader(
        beton, order, 0, 1, args.workers, args.image_size, args.seed, scale=(0.2, 1.0), flip=args.flip
    )
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    run = loader.epoch(0)
    next(run)
    t_first = time.perf_counter() - t1
    _drain(run)
    t_warm = time.perf_counter() - t0
    n_img = 0
    t2 = time.perf_counter()
    for e in range(1, 1 + args.epochs):
        n, _ = _drain(loader.epoch(e))
        n_img += n
    dt = time.perf_counter() - t2
    loader.close()
    return {
        "ffcv_img_s": n_img / dt,
        "ffcv_warmup_s": t_warm,
        "ffcv_build_s": t_build,
        "ffcv_first_batch_s": t_first,
        "ffcv_timed_images": n_img,
        "ffcv_timed_s": dt,
    }


def bench_torchvision(order, args: argparse.Namespace) -> dict:
    from invprop.data.loader import build_dataset, build_train_loader

    t0 = time.perf_counter()
    cfg = _data_cfg(args)
    cfg.augment.crop_scale, cfg.augment.flip = [0.2, 1.0], bool(args.flip)  # as the FFCV side crops
    dataset = build_dataset(cfg, "train", train=True, seed=args.seed)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    _drain(build_train_loader(dataset, order, 0, 0, 0, 1, args.workers), limit=args.tv_warmup_batches)
    t_warm = time.perf_counter() - t1
    n_img = 0
    t2 = time.perf_counter()
    for e in range(1, 1 + args.tv_epochs):
        n, _ = _drain(build_train_loader(dataset, order, e, 0, 0, 1, args.workers))
        n_img += n
    dt = time.perf_counter() - t2
    return {
        "torchvision_img_s": n_img / dt,
        "torchvision_warmup_s": t_warm,
        "torchvision_load_s": t_load,
        "torchvision_timed_images": n_img,
        "torchvision_timed_s": dt,
    }


def bench_resident(order, args: argparse.Namespace) -> dict:
    """`data.format=device`: the uint8 images resident on the device (CUDA when there is one), batches cropped
    there; the same boxes and flips as the other paths, no workers."""
    import torch

    from invprop.data.datasets import load_split
    from invprop.data.device_batches import DeviceBatches

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = load_split(_data_cfg(args), "train")
    resident = DeviceBatches(images, labels, order, seed=args.seed, out_size=args.image_size,
                             crop_scale=(0.2, 1.0), flip=args.flip, device=device)

    def drain(epoch: int, limit: int | None = None) -> int:
        n = _drain(resident.epoch(epoch, 0, 0, 1), limit)[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n

    drain(0, limit=args.tv_warmup_batches)
    t0 = time.perf_counter()
    n_img = sum(drain(e) for e in range(1, 1 + args.tv_epochs))
    dt = time.perf_counter() - t0
    return {"resident_img_s": n_img / dt, "resident_device": str(device), "resident_timed_images": n_img,
            "resident_timed_s": dt}


def profile_ffcv(beton: Path, order, args: argparse.Namespace) -> str:
    """Per-stage timings of FFCV's pipeline and a cProfile of the consumer thread, as text."""
    import cProfile
    import io
    import pstats

    import torch

    from invprop.data.ffcv.loader import build_ffcv_train_loader

    loader = build_ffcv_train_loader(beton, order, 0, 1, args.workers, args.image_size, args.seed)
    _drain(loader.epoch(0))  # compile
    lines = []
    # Stage timings: run the compiled stages directly on this thread, batch by batch.
    ffcv_loader = loader.loader
    loader.traversal.start_batch = 0
    idx = loader.traversal.sample_order(1)
    bs = loader.batch_size
    from ffcv.loader.epoch_iterator import EpochIterator

    it = EpochIterator(ffcv_loader, idx[: bs * 2])
    _drain(it)
    it.close()
    code, outputs = ffcv_loader.code
    mem = ffcv_loader.graph.allocate_memory(bs, 1)
    ctx = ffcv_loader.memory_manager.schedule_epoch([idx[i : i + bs] for i in range(0, len(idx), bs)])
    ctx.__enter__()
    stage_t = [0.0] * len(code)
    n = 0
    for start in range(0, len(idx) - bs + 1, bs):
        batch = idx[start : start + bs]
        a = {
            "batch_indices": batch,
            "storage_state": ctx.state,
            "metadata": ffcv_loader.reader.metadata,
            **{f"memory_{k}": (None if v is None else _slot(v)) for k, v in mem["operation"].items()},
            **{f"shared_memory_{k}": (None if v is None else _slot(v)) for k, v in mem["shared"].items()},
        }
        for s_ix, (stage_code, define_outputs) in enumerate(code):
            t = time.perf_counter()
            res = stage_code(**a)
            stage_t[s_ix] += time.perf_counter() - t
            for node_id, r in zip(define_outputs, res, strict=True):
                a[f"result_{node_id}"] = r
        n += len(batch)
    total = sum(stage_t)
    lines.append(f"FFCV pipeline stages on one thread, {n} images, {args.workers} numba threads:")
    for s_ix, t in enumerate(stage_t):
        kind = "jit" if s_ix % 2 == 0 else "python"
        lines.append(f"  stage {s_ix} ({kind}): {t:.3f} s  ({n / max(t, 1e-9):,.0f} img/s alone)")
    lines.append(f"  all stages: {total:.3f} s -> {n / max(total, 1e-9):,.0f} img/s upper bound")
    # Consumer side: where does the main thread spend its time?
    pr = cProfile.Profile()
    pr.enable()
    t = time.perf_counter()
    m, _ = _drain(loader.epoch(2))
    dt = time.perf_counter() - t
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
    lines.append(f"consumer thread, full epoch: {m / dt:,.0f} img/s; top functions by own time:")
    lines.append(s.getvalue())
    loader.close()
    del torch
    return "\n".join(lines)


def _slot(v):
    if isinstance(v, tuple):
        return tuple(_slot(x) for x in v)
    return v[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "synthetic", "folder"])
    p.add_argument("--root", default=None, help="dataset folder (default: the Debian package's files)")
    p.add_argument("--n", type=int, default=0, help="use the first n training images (0 = all)")
    p.add_argument("--image-size", "--size", type=int, default=None, help="32 (224 for --dataset folder)")
    p.add_argument("--generate", type=int, default=0, help="folder: write this many JPEGs to a temp folder")
    p.add_argument("--resize-mode", default="pad", choices=["pad", "resize"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="timed FFCV epochs after the warm-up epoch")
    p.add_argument("--tv-epochs", type=int, default=1, help="timed torchvision epochs")
    p.add_argument("--tv-warmup-batches", type=int, default=20)
    p.add_argument("--mode", default=None, choices=["raw", "jpg"], help="beton encoding (raw; jpg for folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beton-dir", default=None, help="cache folder for the beton (default: a temp dir)")
    p.add_argument("--skip-torchvision", action="store_true")
    p.add_argument("--profile", action="store_true", help="also print where the FFCV time goes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    folder = args.dataset == "folder"
    args.image_size = args.image_size or (224 if folder else 32)
    args.mode = args.mode or ("jpg" if folder else "raw")
    args.flip = folder  # the ImageNet recipe flips; the small-image default does not
    if folder and not args.root and not args.generate:
        p.error("--dataset folder needs --root (root/train/<class>/<image>) or --generate N")

    from invprop.data.beton_cache import ensure_beton
    from invprop.data.order import EpochOrder

    tmp = None
    if args.beton_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="invprop-bench-")
        beton_dir = tmp.name
    else:
        beton_dir = args.beton_dir
    try:
        if args.generate:
            t0 = time.perf_counter()
            args.root = str(write_folder(Path(beton_dir) / "folder", args.generate, seed=args.seed))
            print(f"wrote {args.generate} JPEGs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        beton = ensure_beton(_data_cfg(args), "train", beton_dir, num_workers=args.workers, progress=not args.json)
        t_write = time.perf_counter() - t0
        from ffcv.reader import Reader

        n = int(Reader(str(beton)).num_samples)
        order = EpochOrder(n, args.batch_size, args.seed)
        res: dict = {
            "dataset": args.dataset,
            "n": n,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "mode": args.mode,
            "cpus": len(os.sched_getaffinity(0)),
            "beton_write_s": t_write,
        }
        res.update(bench_ffcv(beton, order, args))
        if not args.skip_torchvision:
            res.update(bench_torchvision(order, args))
            res["ratio"] = res["ffcv_img_s"] / res["torchvision_img_s"]
        if not folder:  # image files are not held in memory
            res.update(bench_resident(order, args))
            if "torchvision_img_s" in res:
                res["resident_ratio_vs_torchvision"] = res["resident_img_s"] / res["torchvision_img_s"]
        prof = profile_ffcv(beton, order, args) if args.profile else None
    finally:
        if tmp is not None:
            tmp.cleanup()

    if args.json:
        if prof:
            print(prof, file=sys.stderr)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{args.dataset}, {n} images at {args.image_size} px, batch {args.batch_size}, "
                  f"{args.workers} workers, RandomResizedCrop(0.2-1){' + flip' if args.flip else ''}, "
                  f"beton {args.mode}")
        t.add_column("loader")
        t.add_column("images/s", justify="right")
        t.add_column("timed", justify="right")
        t.add_column("warm-up s", justify="right")
        t.add_row("FFCV", f"{res['ffcv_img_s']:,.0f}",
                  f"{res['ffcv_timed_images']:,} img / {res['ffcv_timed_s']:.2f} s",
                  f"{res['ffcv_warmup_s']:.2f} (build {res['ffcv_build_s']:.2f}, "
                  f"first batch {res['ffcv_first_batch_s']:.2f})")
        if "torchvision_img_s" in res:
            t.add_row("torchvision", f"{res['torchvision_img_s']:,.0f}",
                      f"{res['torchvision_timed_images']:,} img / {res['torchvision_timed_s']:.2f} s",
                      f"{res['torchvision_warmup_s']:.2f}")
        if "resident_img_s" in res:
            t.add_row(f"resident ({res['resident_device']})", f"{res['resident_img_s']:,.0f}",
                      f"{res['resident_timed_images']:,} img / {res['resident_timed_s']:.2f} s", "-")
        console = Console()
        console.print(t)
        if "ratio" in res:
            console.print(f"FFCV / torchvision: [bold]{res['ratio']:.1f}x[/bold]  "
                          f"(beton written in {res['beton_write_s']:.1f} s)")
        if "resident_ratio_vs_torchvision" in res:
            console.print(f"resident / torchvision: [bold]{res['resident_ratio_vs_torchvision']:.1f}x[/bold]")
        if prof:
            console.print(prof, markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
