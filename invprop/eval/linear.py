"""Linear probe: frozen backbone, BatchNorm1d + Linear on its pooled features (docs/DESIGN.md, "Evaluation protocols").

The backbone never changes, so its pooled features are computed once (test transform, plus optionally a few
randomly cropped views of every training image) and the head is trained on those tensors with SGD and a
cosine learning-rate schedule: fast even on a CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from invprop.data import eval_split, geometric_augment, is_lazy, load_split, num_classes
from invprop.data.seeding import derive_seed
from invprop.eval.features import embed
from invprop.progress import SILENT, Reporter, Tracker


def eval_section(cfg: Any, name: str) -> dict[str, Any]:
    """``cfg.eval.<name>`` as a plain dict (the values are stated in configs/config.yaml)."""
    return dict(OmegaConf.to_container(cfg.eval[name], resolve=True))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run per-sample CPU image ops on one intra-op thread: for 32px crops, thread start-up costs about
    ten times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def crop_batch(images: torch.Tensor, indices: list[int], seeds: list[int], crop_scale: tuple[float, float],
               flip: bool) -> torch.Tensor:
    """Random resized crops (the evaluation size) of ``images[indices]``, sample j from ``seeds[j]``; for
    folder images the crop is taken from the decoded file."""
    size = int(images.image_size if is_lazy(images) else images.shape[-1])
    with single_thread():
        return torch.stack([geometric_augment(images[i], size, torch.Generator().manual_seed(s), scale=crop_scale,
                                              flip=flip) for i, s in zip(indices, seeds, strict=True)])


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction (0..1) of rows whose label is among the k highest logits, for each k (k capped at C)."""
    labels = labels.to(logits.device)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return [hit[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in ks]


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, data_cfg: Any, device: torch.device,
                    batch_size: int = 512, *, view: int | None = None, seed: int = 0,
                    crop_scale: tuple[float, float] = (0.2, 1.0), flip: bool = False,
                    offset: int = 0, progress: Tracker | None = None) -> torch.Tensor:
    """Pooled backbone features of uint8 images with the test transform (``view=None``), or of random
    resized crops: view ``v`` of image ``i`` is cropped with a generator seeded from (seed, v, i), where ``i``
    counts from ``offset`` (a rank's shard: its first row's index in the split). ``progress`` advances by the
    images done."""
    if view is None:
        return embed(model, images, data_cfg, device, batch_size, pooled=True, progress=progress)
    out = []
    for lo in range(0, len(images), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(images))))
        crops = crop_batch(images, idx, [derive_seed(seed, 0x11FEA7, view, offset + i) for i in idx], crop_scale,
                           flip)
        out.append(embed(model, crops, data_cfg, device, batch_size, pooled=True, progress=progress))
    return torch.cat(out)


class LinearClassifier(nn.Module):
    """BatchNorm1d (no affine: it only standardises the frozen features) followed by a Linear layer."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False)
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


# On the CPU, steps smaller than this many multiply-adds run on one thread: thread hand-off costs more than
# such a step, and far more on shared cores (10-40x slower measured on 2 busy cores).
SMALL_STEP_MACS = 1 << 25


def fit_linear_head(train_feats: torch.Tensor, train_labels: torch.Tensor, n_classes: int, epochs: int,
                    lr: float, *, batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                    seed: int = 0, report: Reporter = SILENT) -> LinearClassifier:
    """Train a :class:`LinearClassifier` on ``(N, D)`` features, or ``(V, N, D)`` views of them (each epoch
    uses one randomly chosen view per sample). SGD with momentum, cosine lr to 0 over all steps. ``report``
    tells the epochs' progress and mean loss."""
    if train_feats.ndim == 2:
        train_feats = train_feats.unsqueeze(0)
    n_views, n, dim = train_feats.shape
    if train_labels.shape[0] != n:
        raise ValueError(f"{n} training features but {train_labels.shape[0]} labels")
    small = train_feats.device.type == "cpu" and batch_size * dim * n_classes <= SMALL_STEP_MACS
    with single_thread() if small else contextlib.nullcontext(), \
            report.track("linear probe", epochs, unit="epoch") as progress:
        return _fit(train_feats, train_labels, n_classes, epochs, lr, batch_size, weight_decay, momentum, seed,
                    progress)


def _fit(train_feats: torch.Tensor, train_labels: torch.Tensor, n_classes: int, epochs: int, lr: float,
         batch_size: int, weight_decay: float, momentum: float, seed: int, progress: Tracker) -> LinearClassifier:
    n_views, n, dim = train_feats.shape
    device = train_feats.device
    labels = train_labels.to(device)
    with torch.random.fork_rng(devices=[]):  # the head's init must not touch (or depend on) the global RNG
        torch.manual_seed(derive_seed(seed, 0x1EAD))
        head = LinearClassifier(dim, n_classes)
    head.to(device).train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x5BFF1E))
    # Drop a trailing batch of one: BatchNorm cannot train on it.
    steps_per_epoch = max(1, n // batch_size + (1 if n % batch_size > 1 else 0))
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        loss_sum = torch.zeros((), device=device)  # summed on the device: read once per epoch, when shown
        order = torch.randperm(n, generator=gen).to(device)
        views = torch.randint(n_views, (n,), generator=gen).to(device) if n_views > 1 else None
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = train_feats[0, idx] if views is None else train_feats[views[idx], idx]
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            loss = nn.functional.cross_entropy(head(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
        progress.advance(1, lambda s=loss_sum: f"loss {s.item() / steps_per_epoch:.4f}")
    return head.eval()


@torch.no_grad()
def predict(head: nn.Module, feats: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    was_training = head.training
    head.eval()
    out = torch.cat([head(feats[lo : lo + chunk]) for lo in range(0, feats.shape[0], chunk)])
    head.train(was_training)
    return out


def train_linear_head(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1, *,
                      batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                      seed: int = 0, report: Reporter = SILENT) -> dict[str, float]:
    """Fit the probe on precomputed features and report ``linear_top1`` / ``linear_top5`` (0..1) on the test
    features. ``train_feats`` is ``(N, D)`` or ``(V, N, D)`` (augmented views)."""
    head = fit_linear_head(train_feats, train_labels, num_classes, epochs, lr, batch_size=batch_size,
                           weight_decay=weight_decay, momentum=momentum, seed=seed, report=report)
    top1, top5 = topk_accuracy(predict(head, test_feats.to(train_feats.device)), test_labels)
    return {"linear_top1": top1, "linear_top5": top5}


def linear_probe(cfg: Any, model: nn.Module, device: torch.device, *, epochs: int | None = None,
                 lr: float | None = None, batch_size: int | None = None, weight_decay: float | None = None,
                 aug_views: int | None = None, seed: int | None = None,
                 train_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                 test_split: tuple[torch.Tensor, torch.Tensor] | None = None,
                 report: Reporter = SILENT) -> dict[str, float]:
    """The linear-probe evaluation of ``model`` (an EmbeddingModel; only ``.features`` is used, frozen).

    Settings come from ``cfg.eval.linear``; keyword arguments override them. ``report`` tells the progress of
    the feature passes and of the probe's epochs.
    ``train_split`` / ``test_split`` (uint8 images, labels) default to ``load_split(cfg.data, ...)``.
    Returns ``linear_top1``, ``linear_top5`` (fractions) and ``linear_eval_s``.
    """
    start = time.perf_counter()
    opts = eval_section(cfg, "linear")
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
             "aug_views": aug_views, "seed": seed}
    opts.update({k: v for k, v in given.items() if v is not None})
    train_images, train_labels = train_split if train_split is not None else load_split(cfg.data, "train")
    test_images, test_labels = test_split if test_split is not None else load_split(cfg.data, eval_split(cfg.data))
    embed_bs = int(cfg.eval.batch_size)
    crop_scale = tuple(float(v) for v in cfg.data.augment.crop_scale)
    flip = bool(cfg.data.augment.flip)

    views = int(opts["aug_views"])
    with report.track("linear features train", len(train_images) * (1 + views), unit="img") as progress:
        feats = [pooled_features(model, train_images, cfg.data, device, embed_bs, progress=progress)]
        for view in range(views):
            feats.append(pooled_features(model, train_images, cfg.data, device, embed_bs, view=view,
                                         seed=int(opts["seed"]), crop_scale=crop_scale, flip=flip, progress=progress))
    train_feats = torch.stack(feats) if len(feats) > 1 else feats[0]
    with report.track("linear features test", len(test_images), unit="img") as progress:
        test_feats = pooled_features(model, test_images, cfg.data, device, embed_bs, progress=progress)
    features_s = time.perf_counter() - start
    results = train_linear_head(train_feats, train_labels, test_feats, test_labels, num_classes(cfg.data),
                                int(opts["epochs"]), float(opts["lr"]), batch_size=int(opts["batch_size"]),
                                weight_decay=float(opts["weight_decay"]), momentum=float(opts["momentum"]),
                                seed=int(opts["seed"]), report=report)
    results["linear_features_s"] = features_s
    results["linear_eval_s"] = time.perf_counter() - start
    return results
