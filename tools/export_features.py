"""`python tools/export_features.py <run dir> --split train|test --out feats.npz`: features for other tools.

Loads the run's newest committed checkpoint and writes pooled backbone features (or, with --embedding, the
L2-normalised head embeddings) computed with the test transform, as numpy arrays: `features` (N, D) float32,
`labels` (N,) int64, plus `checkpoint` (its directory name). Written to a temporary file, then os.replace'd.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from invprop import checkpoint
from invprop.config import load_run_config
from invprop.data import load_split
from invprop.eval.features import embed
from invprop.models import build_model


def load_run_model(run_dir: Path, device: torch.device):
    """(config, model with the newest committed weights, checkpoint directory)."""
    cfg = load_run_config(Path(run_dir) / "config.yaml")
    latest = checkpoint.latest(Path(run_dir) / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no committed checkpoint under {Path(run_dir) / 'checkpoints'}")
    model = build_model(cfg.model)
    model.load_state_dict(checkpoint.load_state(latest)["model"])
    return cfg, model.to(device).eval(), latest


class ExportError(OSError):
    """--out cannot be written; the message names it and the fix."""


def _open_destination(out: Path) -> tuple[Path, object]:
    """The temporary file beside `out`, opened before any work so an unwritable --out costs nothing."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as {out / 'features.npz'}")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return tmp, open(tmp, "wb")  # a file object: np.savez would otherwise append ".npz" to the name
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable "
                          "place") from None


def export_features(run_dir: Path, split: str, out: Path, *, embedding: bool = False, batch_size: int = 512,
                    device: str | None = None) -> dict[str, np.ndarray]:
    out = Path(out)
    tmp, fh = _open_destination(out)
    try:
        with fh:
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            cfg, model, latest = load_run_model(run_dir, dev)
            images, labels = load_split(cfg.data, split)
            feats = embed(model, images, cfg.data, dev, batch_size, pooled=not embedding)
            arrays = {"features": feats.cpu().numpy().astype(np.float32),
                      "labels": labels.numpy().astype(np.int64), "checkpoint": np.array(latest.name)}
            np.savez(fh, **arrays)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", choices=("train", "test", "val"), default="train", help="val: image folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--embedding", action="store_true", help="head embeddings instead of pooled features")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    try:
        arrays = export_features(args.run_dir, args.split, args.out, embedding=args.embedding,
                                 batch_size=args.batch_size, device=args.device)
    except OSError as err:  # no checkpoint, or an --out that cannot be written: one line
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: features {arrays['features'].shape}, labels {arrays['labels'].shape} "
          f"from {arrays['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
