#!/usr/bin/env python
"""Write a dataset split to an FFCV ``.beton`` (fields ``image``, ``label``, ``index``).

Examples::

    python tools/write_beton.py --dataset fashion_mnist --split train --out betons/fmnist-train.beton
    python tools/write_beton.py --dataset cifar10 --root ~/data --split test --out c10-test.beton
    python tools/write_beton.py --dataset svhn --root ~/data/svhn --split train --out svhn-train.beton
    python tools/write_beton.py --dataset folder --root /data/imagenet --split train --out in1k-train.beton \\
        --mode jpg --max-resolution 256 --jpeg-quality 90 --workers 16

``index`` is the row of each sample (its row in the memory bank). The file is written to a temporary name
beside ``--out`` and moved into place at the end; an existing file is kept unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASETS = ["fashion_mnist", "synthetic", "cifar10", "cifar100", "svhn", "folder"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--split", default="train", help="train | test (svhn also: extra; folder: any sub-folder)")
    p.add_argument("--out", required=True, help="destination .beton")
    p.add_argument("--root", default=None, help="dataset folder (fashion_mnist: default Debian package files)")
    p.add_argument("--mode", default="raw", choices=["raw", "jpg"], help="image encoding (default raw)")
    p.add_argument("--max-resolution", type=int, default=None, help="shrink images so the longer side <= this")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: min(8, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--subset", type=int, default=0, help="keep the first n training images (0 = all)")
    g = p.add_argument_group("fashion_mnist / synthetic")
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--resize-mode", default="pad", choices=["pad", "resize"])
    g.add_argument("--n-train", type=int, default=None, help="synthetic: training samples")
    g.add_argument("--n-test", type=int, default=None, help="synthetic: test samples")
    g.add_argument("--num-classes", type=int, default=None, help="synthetic: classes")
    g.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    args = p.parse_args(argv)

    from rich.console import Console

    from invprop.data.beton import build_source, write_beton

    console = Console(stderr=True)
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        console.print(f"[red]{out} exists[/red]; pass --overwrite to replace it")
        return 1
    from invprop.config import tool_data_section

    cfg = tool_data_section({
        "name": args.dataset,
        "root": args.root,
        "subset": args.subset,
        "image_size": args.image_size,
        "resize_mode": args.resize_mode,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "num_classes": args.num_classes,
        "seed": args.seed,
    })
    t0 = time.perf_counter()
    try:
        source = build_source(cfg, args.split)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]cannot read {args.dataset} ({args.split}):[/red] {e}")
        return 1
    t_load = time.perf_counter() - t0
    path = write_beton(
        source,
        out,
        mode=args.mode,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        num_workers=args.workers,
        overwrite=args.overwrite,
    )
    dt = time.perf_counter() - t0
    size_mb = path.stat().st_size / 2**20
    console.print(
        f"wrote [bold]{path}[/bold]: {len(source):,} samples, {size_mb:,.1f} MiB, "
        f"{dt:.1f} s ({t_load:.1f} s reading the source)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
