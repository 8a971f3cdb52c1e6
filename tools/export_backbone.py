"""`python tools/export_backbone.py <run dir> --out r50.pth [--format torchvision|invprop]`.

Writes the backbone of the run's newest committed checkpoint as a plain state_dict (projection head and
memory bank dropped). For model.arch=resnet50 the keys are torchvision's: the file loads into
`torchvision.models.resnet50()` with `strict=False`, reporting only `fc.weight`/`fc.bias` missing. For the
CIFAR ResNets it loads strictly into `invprop.models.build_backbone(arch)[0]`. `--format torchvision` (the
default) writes nothing but the state_dict; `--format invprop` wraps it with the arch and the checkpoint name.
The file is checked by loading it into a fresh backbone, then written to a temporary name and os.replace'd;
an existing --out is never overwritten, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from invprop import checkpoint
from invprop.config import load_run_config
from invprop.models import build_backbone

PREFIX = "backbone."


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of an EmbeddingModel state_dict, prefix stripped, as standalone tensors."""
    return {k[len(PREFIX):]: v.detach().clone().contiguous() for k, v in model_state.items() if k.startswith(PREFIX)}


class ExportError(Exception):
    """Something the user can fix: named in one line."""


def export_backbone(run_dir: Path, out: Path, fmt: str = "torchvision") -> dict:
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() or out.is_symlink():
        kind = "a folder" if out.is_dir() else "a file"
        raise ExportError(f"--out {out} is {kind} that already exists; remove it or choose a new file name")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_run_config(run_dir / "config.yaml")
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no committed checkpoint under {run_dir / 'checkpoints'}")
    arch = str(cfg.model.arch)
    state = backbone_state_dict(checkpoint.load_state(latest)["model"])
    fresh, feature_dim = build_backbone(arch)
    fresh.load_state_dict(state, strict=True)  # our backbone; resnet50's has no fc keys (fc is Identity)
    payload = state if fmt == "torchvision" else {"arch": arch, "feature_dim": feature_dim,
                                                  "checkpoint": str(latest), "state_dict": state}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save_atomic(payload, out)  # a failed write removes its temporary file
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return {"arch": arch, "checkpoint": latest.name, "tensors": len(state),
            "parameters": sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--format", choices=("torchvision", "invprop"), default="torchvision")
    args = parser.parse_args(argv)
    try:
        info = export_backbone(args.run_dir, args.out, args.format)
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the tool's top level: one line, no traceback
        print(f"error: {' '.join(str(err).split())} ({type(err).__name__})", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {info['arch']} backbone from {info['checkpoint']}, {info['tensors']} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
