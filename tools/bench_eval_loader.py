"""Evaluation-feature loading speed: the FFCV centre-crop reader against the PIL/torchvision path, one run.

Generates an ImageNet-shaped JPEG folder (the tests' own writer: 100 classes, 300-500 px a side), writes its
.beton once (timed apart), then reads the whole training split as evaluation sees it (centred square of
eval_crop_ratio of the shorter side, resized to the image size; uint8 (B, 3, S, S) batches in order) through
FFCVEvalLoader and through FolderImages + DataLoader workers (PIL decode), with the same workers and batch.
Each path makes one warm-up pass (FFCV's pipeline compiles; both fill the page cache) and one timed pass.

With ``--crops`` the same run also times the trained evaluations' training crops (the online linear probe's
RandomResizedCrop scale 0.08-1 + flip, semisup's): the seeded order's batches through FFCV's crop reader
(``invprop.eval.crops.FFCVCrops``, ``--workers`` threads) against ``crop_batch`` (PIL decode + crop on the
rank's main thread, one core: the fallback path), one warm-up epoch for FFCV, then one timed epoch each.

    .venv/bin/python tools/bench_eval_loader.py --images 2000 --workers 2 --crops --out docs/results/eval_loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pass(batches) -> tuple[int, float]:
    """(images, seconds) of one full pass."""
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += int((batch[0] if isinstance(batch, tuple | list) else batch).shape[0])
    return n, time.perf_counter() - start


def _crops(images, beton: Path, args: argparse.Namespace) -> dict:
    """Training crops (scale 0.08-1, flip) of the seeded order's batches: FFCV's reader against crop_batch."""
    import torch

    from invprop.data.order import EpochOrder
    from invprop.data.seeding import derive_seed
    from invprop.eval.crops import FFCVCrops
    from invprop.eval.linear import crop_batch

    n = len(images)
    order, rows, scale = EpochOrder(n, min(args.batch_size, n), 0), torch.arange(n), (0.08, 1.0)

    def epoch(read, e: int) -> tuple[int, float]:
        return _pass(read(e, b, order.local_indices(e, b, 0, 1)) for b in range(order.num_batches))

    reader = FFCVCrops(beton, order, rows, n, 0, 1, args.workers, args.image_size, 7, scale, True)
    try:
        first = epoch(reader, 0)  # compiles the pipeline
        n_ffcv, ffcv_s = epoch(reader, 1)
    finally:
        reader.close()
    pil = lambda e, b, idx: crop_batch(images, idx.tolist(), [derive_seed(7, e, int(i)) for i in idx],  # noqa: E731
                                       scale, True)
    n_pil, pil_s = epoch(pil, 1)
    return {"crops_scale": list(scale), "crops_images": n_ffcv, "crops_ffcv_first_epoch_s": round(first[1], 2),
            "crops_ffcv_img_s": round(n_ffcv / ffcv_s, 1), "crops_pil_img_s": round(n_pil / pil_s, 1),
            "crops_ratio_ffcv_over_pil": round((n_ffcv / ffcv_s) / (n_pil / pil_s), 2),
            "crops_note": f"FFCV: {args.workers} worker threads; PIL: crop_batch on the main thread (one core), "
                          "as the online probe and semisup ran before"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="training JPEGs to generate (100 classes)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--crops", action="store_true", help="also time the training crops: FFCV against PIL")
    p.add_argument("--out", default=str(ROOT / "docs/results/eval_loader.json"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from datafiles import write_image_folder

    from invprop.config import tool_data_section
    from invprop.data import eval_batches, load_split
    from invprop.data.beton_cache import ensure_beton
    from invprop.data.ffcv.loader import FFCVEvalLoader

    with tempfile.TemporaryDirectory(prefix="invprop-evalbench-") as tmp:
        t0 = time.perf_counter()
        per_class = max(1, args.images // args.classes)
        root = write_image_folder(Path(tmp) / "folder", classes=args.classes, per_class=(per_class, 1),
                                  sizes=(300, 500))
        generate_s = time.perf_counter() - t0
        cfg = tool_data_section({"name": "folder", "root": str(root), "image_size": args.image_size,
                                 "eval_workers": args.workers})
        images, _labels = load_split(cfg, "train")
        t0 = time.perf_counter()
        beton = ensure_beton(cfg, "train", Path(tmp) / "beton", num_workers=args.workers, progress=False)
        beton_s = time.perf_counter() - t0

        loader = FFCVEvalLoader(beton, args.batch_size, args.workers, args.image_size,
                                center_crop_ratio=images.eval_crop_ratio)
        first_ffcv = _pass(loader)  # compiles the pipeline
        n_ffcv, ffcv_s = _pass(loader)
        loader.close()
        first_pil = _pass(eval_batches(images, args.batch_size, args.workers))
        n_pil, pil_s = _pass(eval_batches(images, args.batch_size, args.workers))
        crops = _crops(images, beton, args) if args.crops else {}
    if n_ffcv != n_pil:
        raise SystemExit(f"the paths read different counts: FFCV {n_ffcv}, PIL {n_pil}")
    result = {"images": n_pil, "classes": args.classes, "source_px": [300, 500], "image_size": args.image_size,
              "batch_size": args.batch_size, "workers": args.workers, "cpus": len(os.sched_getaffinity(0)),
              "generate_s": round(generate_s, 2), "beton_write_s": round(beton_s, 2),
              "ffcv_first_pass_s": round(first_ffcv[1], 2), "pil_first_pass_s": round(first_pil[1], 2),
              "ffcv_img_s": round(n_ffcv / ffcv_s, 1), "pil_img_s": round(n_pil / pil_s, 1),
              "ratio_ffcv_over_pil": round((n_ffcv / ffcv_s) / (n_pil / pil_s), 2),
              **crops,
              "note": "steady pass after a warm-up pass each; the machine's cores are shared with other jobs"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
