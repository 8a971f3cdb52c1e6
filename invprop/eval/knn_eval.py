"""The weighted-kNN evaluation of a trained run: over bank rows and over recomputed features."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from invprop.bank import ShardedBank
from invprop.config.schema import Config
from invprop.data import eval_split, is_lazy, num_classes
from invprop.data.order import shard_bounds
from invprop.eval.features import embed_and_pool
from invprop.eval.knn import knn_correct, knn_top1
from invprop.eval.readers import EvalReader
from invprop.progress import SILENT, Reporter


def evaluate_knn_world(cfg: Config, model: torch.nn.Module, bank: ShardedBank,
                       train_split: tuple[torch.Tensor, torch.Tensor],
                       test_split: tuple[torch.Tensor, torch.Tensor], report: Reporter = SILENT,
                       reader: EvalReader | None = None) -> dict[str, float]:
    """knn_top1 (head embeddings; reference = the train split recomputed with the test transform),
    knn_backbone_top1 (the backbone's pooled features, L2-normalised: what users fine-tune) and knn_bank_top1
    (the bank's rows as reference), from the ranks of `bank.comm` (an evaluation world, or training's ranks for
    the curves during training), each featuring only its part of the train split (the bank's rows) and its
    part of the test split, once; exact global top-K over the sharded references
    (:func:`invprop.eval.knn.knn_correct`). Every rank calls it and gets the same numbers. `report` tells the
    progress of this rank's two feature passes (silent by default). `reader` says how the passes read pixels
    (default: FFCV for image folders under data.format=ffcv, :mod:`invprop.eval.readers`)."""
    start = time.perf_counter()
    comm, device = bank.comm, bank.comm.device
    (train_images, train_labels), (test_images, test_labels) = train_split, test_split
    reader = reader or EvalReader.for_config(cfg.data, comm, is_lazy(train_images))
    lo, hi = shard_bounds(len(test_labels), comm.rank, comm.world)
    classes, k, sigma, bs = num_classes(cfg.data), cfg.eval.knn_k, cfg.eval.knn_sigma, cfg.eval.batch_size
    test_rows = reader.rows(test_images, eval_split(cfg.data), lo, hi)
    with report.track("knn features test", hi - lo, unit="img") as progress:
        queries, pooled_queries = embed_and_pool(model, test_rows, cfg.data, device, bs, progress)
    train_rows = reader.rows(train_images, "train", bank.start, bank.stop)
    with report.track("knn features train", bank.stop - bank.start, unit="img") as progress:
        refs, pooled_refs = embed_and_pool(model, train_rows, cfg.data, device, bs, progress)
    ref_labels, query_labels = train_labels[bank.start : bank.stop].to(device), test_labels[lo:hi]

    def top1(q: torch.Tensor, r: torch.Tensor) -> float:
        correct, total = knn_correct(q, query_labels, r, ref_labels, classes, k, sigma, comm=comm)
        return correct / total

    return {"knn_top1": top1(queries, refs),
            "knn_backbone_top1": top1(F.normalize(pooled_queries, dim=1), F.normalize(pooled_refs, dim=1)),
            "knn_bank_top1": top1(queries, bank.rows),
            "knn_eval_s": time.perf_counter() - start}


def pixel_vectors(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images as L2-normalised pixel vectors (one channel: grey images replicated to RGB add nothing)."""
    x = images[:, :1] if images.shape[1] == 3 and torch.equal(images[:, 0], images[:, 1]) else images
    return torch.nn.functional.normalize(x.reshape(x.shape[0], -1).to(device).float(), dim=1)


def evaluate_pixels_knn(cfg: Config, bank: ShardedBank, train_images: torch.Tensor, train_labels: torch.Tensor,
                        test_split: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> dict[str, float]:
    """The raw-pixel baselines on the same split and reference set: weighted kNN (same K, sigma) and 1-NN.
    None for image folders: at 224 px pixel vectors mean nothing and the reference set would not fit."""
    if is_lazy(train_images):
        return {}
    test_images, test_labels = test_split
    classes, k, sigma = num_classes(cfg.data), cfg.eval.knn_k, cfg.eval.knn_sigma
    queries = pixel_vectors(test_images, device)
    refs = pixel_vectors(train_images[bank.start : bank.stop], device)
    ref_labels = train_labels[bank.start : bank.stop].to(device)
    return {"knn_pixels_top1": knn_top1(queries, test_labels, refs, ref_labels, classes, k, sigma, comm=bank.comm),
            "nn1_pixels_top1": knn_top1(queries, test_labels, refs, ref_labels, classes, 1, sigma, comm=bank.comm)}
