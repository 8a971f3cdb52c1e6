"""Evaluation protocols: weighted kNN, linear probe, label subsets, semi-supervised fine-tuning, results.json."""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import re
import tempfile

import pytest
import torch
from composed import compose_config
from omegaconf import OmegaConf
from rich.console import Console

from invprop.bank import ShardedBank
from invprop.collectives import Comm
from invprop.data import load_split
from invprop.eval.features import embed
from invprop.eval.knn import knn_predict, knn_top1
from invprop.eval.knn_eval import evaluate_knn_world, pixel_vectors
from invprop.eval.linear import topk_accuracy
from invprop.eval.linear_world import fit_head_world, held_out_rows, linear_eval
from invprop.eval.semisup import FineTuneNet, finetune_optimizer
from invprop.eval.semisup_world import finetune_world, semisup_world
from invprop.eval.subsets import (
    balanced_subset,
    fraction_tag,
    load_or_create_subset,
    read_subset,
    subset_path,
    write_subset,
)
from invprop.metrics import update_results
from invprop.models import build_model
from invprop.progress import Reporter
from invprop.schedules import milestone_factor, scaled_milestones

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**eval_sections):
    cfg = compose_config("data=synthetic", "data.n_train=200", "data.n_test=100", "data.num_classes=4",
                         "data.image_size=16", "data.augment.crop_scale=[0.2,1.0]", "data.augment.flip=false",
                         "model=resnet_tiny", "model.embedding_dim=16", "eval.knn_k=20", "eval.knn_sigma=0.07",
                         "eval.batch_size=256")
    return OmegaConf.merge(cfg, {"eval": eval_sections})


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg.model)


def _splits(cfg):
    return load_split(cfg.data, "train"), load_split(cfg.data, "test")


def _knn(cfg, model, bank, report=None):
    """The world kNN on one rank (Comm()): the bank holds every row."""
    train, test = _splits(cfg)
    return evaluate_knn_world(cfg, model, bank, train, test, **({"report": report} if report else {}))


def _linear(cfg, model, report=None):
    return linear_eval(cfg, model, Comm(), *_splits(cfg), **({"report": report} if report else {}))


def _semisup(cfg, model, run_dir, report=None):
    return semisup_world(cfg, model, Comm(), run_dir, *_splits(cfg), **({"report": report} if report else {}))


# -- weighted kNN -------------------------------------------------------------------------------------------


def test_knn_votes_on_hand_made_features():
    ref = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    ref_labels = torch.tensor([0, 0, 1, 2])
    q = torch.tensor([[0.6, 0.8]])  # similarities 0.6, 0.96, 0.8, -0.6
    sigma = 0.5
    votes = knn_predict(q, ref, ref_labels, num_classes=3, k=3, sigma=sigma)
    expected = torch.tensor([[math.exp(0.96 / sigma) + math.exp(0.6 / sigma), math.exp(0.8 / sigma), 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(votes, expected)
    # K larger than the reference set: padded candidates must add nothing.
    torch.testing.assert_close(knn_predict(q, ref, ref_labels, 3, k=200, sigma=sigma)[:, :2],
                               knn_predict(q, ref, ref_labels, 3, k=4, sigma=sigma)[:, :2])


def test_knn_weighting_beats_majority_and_top1_is_a_fraction():
    # One very close neighbour of class 1 against two far ones of class 0: the exp(sim/sigma) weights decide.
    ref = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.5, 0.9], [0.5, -0.9]]), dim=1)
    ref_labels = torch.tensor([1, 0, 0])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert knn_predict(queries[:1], ref, ref_labels, 2, k=3, sigma=0.07).argmax(1).item() == 1
    assert knn_predict(queries[:1], ref, ref_labels, 2, k=3, sigma=100.0).argmax(1).item() == 0  # ~majority
    assert knn_top1(queries, torch.tensor([1, 0]), ref, ref_labels, 2, k=3, sigma=0.07) == 1.0
    assert knn_top1(queries, torch.tensor([1, 1]), ref, ref_labels, 2, k=3, sigma=0.07) == 0.5


def test_bank_knn_equals_recomputed_knn_when_the_bank_holds_the_features():
    cfg = _cfg()
    model = _model(cfg)
    images, labels = load_split(cfg.data, "train")
    bank = ShardedBank(len(labels), 16)
    bank.rows = embed(model, images, cfg.data, CPU, 256)
    out = _knn(cfg, model, bank)
    assert out["knn_top1"] == out["knn_bank_top1"]
    bank.rows = torch.nn.functional.normalize(torch.randn_like(bank.rows), dim=1)  # the check can fail
    assert _knn(cfg, model, bank)["knn_bank_top1"] != out["knn_top1"]


def test_backbone_knn_uses_the_pooled_features_not_the_head():
    cfg = _cfg()
    model = _model(cfg)
    images, labels = load_split(cfg.data, "train")
    test_images, test_labels = load_split(cfg.data, "test")
    bank = ShardedBank(len(labels), 16)
    out = _knn(cfg, model, bank)

    def pooled(x):
        return torch.nn.functional.normalize(embed(model, x, cfg.data, CPU, 256, pooled=True), dim=1)

    k, sigma = cfg.eval.knn_k, cfg.eval.knn_sigma

    def reference(queries, refs):  # single-process votes over every reference: the exact figure
        return (knn_predict(queries, refs, labels, 4, k, sigma).argmax(1) == test_labels).sum().item() / 100

    expected = reference(pooled(test_images), pooled(images))
    assert out["knn_backbone_top1"] == expected
    # and the head's embeddings
    assert out["knn_top1"] == reference(embed(model, test_images, cfg.data, CPU, 256),
                                        embed(model, images, cfg.data, CPU, 256))
    with torch.no_grad():  # a different backbone gives a different figure, while the head-only score is kept
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    assert _knn(cfg, model, bank)["knn_backbone_top1"] != expected


# -- linear probe -------------------------------------------------------------------------------------------


def _separable(n, classes=5, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, dim, generator=g) * 3 + 1.5  # off-centre and scaled: BatchNorm has work to do
    return x, ((x - 1.5) @ w).argmax(1)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_accuracy(logits, torch.tensor([0, 1]), (1, 2)) == [0.5, 1.0]
    assert topk_accuracy(logits, torch.tensor([1, 0]), (1, 5)) == [0.0, 1.0]  # k capped at C


def _head_top1(x, y, xt, yt, **linear):
    cfg = _cfg(linear={"epochs": 20, "lrs": [0.1], "batch_size": 256, **linear})
    head = fit_head_world(x if x.ndim == 3 else x.unsqueeze(0), y, 5, cfg, Comm())
    return topk_accuracy(head(xt).detach(), yt)


def test_linear_probe_separates_separable_features_and_not_shuffled_labels():
    x, y = _separable(2000)
    xt, yt = _separable(1000, seed=1)
    top1, top5 = _head_top1(x, y, xt, yt)
    assert top1 > 0.93 and top5 == 1.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    majority = torch.bincount(yt, minlength=5).max().item() / len(yt)
    assert _head_top1(x, shuffled, xt, yt)[0] < majority + 0.06
    # Views (V, N, D): a second, noisy copy of the features still trains.
    views = torch.stack([x, x + 0.1 * torch.randn_like(x)])
    assert _head_top1(views, y, xt, yt)[0] > 0.9


def test_linear_probe_on_a_model_reads_config_and_is_deterministic():
    cfg = _cfg(linear={"epochs": 3, "batch_size": 64, "lrs": [0.1], "val_fraction": 0.0})
    model = _model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = _linear(cfg, model), _linear(cfg, model)
    assert set(a) >= {"linear_top1", "linear_top5", "linear_eval_s"}
    assert 0.0 <= a["linear_top1"] <= a["linear_top5"] <= 1.0
    assert a["linear_top1"] == b["linear_top1"] and a["linear_head_digest"] == b["linear_head_digest"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # frozen backbone
    with_views = _linear(OmegaConf.merge(cfg, {"eval": {"linear": {"aug_views": 1, "epochs": 2}}}), model)
    assert 0.0 <= with_views["linear_top1"] <= 1.0
    assert with_views["linear_head_digest"] != a["linear_head_digest"]


ONLINE = {"mode": "online", "epochs": 3, "batch_size": 64, "lrs": [1.0], "val_fraction": 0.0,
          "schedule": "step", "milestones": [1, 2],
          "gamma": 0.1, "crop_scale": [0.08, 1.0]}


def test_online_probe_crops_through_the_backbone_every_step_and_resumes_bit_for_bit(tmp_path):
    """The authors' protocol at a tiny size (16 px, 3 epochs, lr steps at epochs 1 and 2): every step's crops go
    through the frozen backbone (nothing precomputed), and a probe stopped at step 4 resumes to the same head."""
    cfg = _cfg(linear=ONLINE)
    model = _model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    whole = _linear(cfg, model)
    assert seen == [64] * 9 + [100]  # 3 epochs of 3 global batches of 64 crops, then the test split once
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # frozen, BN statistics too
    features_mode = _linear(OmegaConf.merge(cfg, {"eval": {"linear": {"mode": "features"}}}), model)
    assert features_mode["linear_head_digest"] != whole["linear_head_digest"]
    stopping = OmegaConf.merge(cfg, {"eval": {"stop_at_step": 4, "checkpoint_every_steps": 2}})
    root = tmp_path / "eval"
    assert linear_eval(stopping, model, Comm(), *_splits(cfg), root=root) == {"preempted_at_step": 4}
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_4"]
    resumed = linear_eval(cfg, model, Comm(), *_splits(cfg), root=root)
    assert resumed["linear_head_digest"] == whole["linear_head_digest"]
    assert resumed["linear_top1"] == whole["linear_top1"]


def test_held_out_rows_are_class_balanced_seeded_and_disjoint():
    labels = torch.cat([torch.full((300,), 0), torch.full((100,), 1)])[torch.randperm(400)]
    rows, held = held_out_rows(labels, 0.1, seed=3)
    assert torch.bincount(labels[held], minlength=2).tolist() == [30, 10]
    assert sorted(rows.tolist() + held.tolist()) == list(range(400))
    assert torch.equal(held, held_out_rows(labels, 0.1, seed=3)[1])
    assert not torch.equal(held, held_out_rows(labels, 0.1, seed=4)[1])
    assert held_out_rows(labels, 0.0, seed=3)[1].numel() == 0


def test_lr_grid_chooses_on_held_out_training_images_before_the_test_split_is_read():
    cfg = _cfg(linear={"epochs": 3, "batch_size": 64, "lrs": [1e-4, 0.3, 0.03], "val_fraction": 0.2})
    model = _model(cfg)
    told = io.StringIO()
    report = Reporter(console=Console(file=told, force_terminal=False, width=200), clock=lambda: 0.0)
    train, test = _splits(cfg)
    asked = []

    def load_test():
        asked.append(told.getvalue())  # what had been told when the test split was asked for
        return test

    grid = linear_eval(cfg, model, Comm(), train, load_test, report=report)
    assert len(asked) == 1 and f"linear lr {grid['linear_lr']:g} chosen on" in asked[0]
    assert "linear features test" not in asked[0]
    by_lr = grid["linear_val_top1_by_lr"]
    assert set(by_lr) == {"0.0001", "0.3", "0.03"}
    assert grid["linear_lr"] == max([1e-4, 0.3, 0.03], key=lambda lr: by_lr[f"{lr:g}"])
    assert by_lr["0.0001"] < by_lr[f"{grid['linear_lr']:g}"]  # the grid has a worse head to pass over
    assert grid["linear_val_images"] == sum(round(0.2 * n) for n in torch.bincount(train[1]).tolist())
    # the chosen head is the very head a run with that lr alone trains (same init, rows and order)
    alone = linear_eval(OmegaConf.merge(cfg, {"eval": {"linear": {"lrs": [grid["linear_lr"]]}}}), model, Comm(),
                        train, test)
    for key in ("linear_head_digest", "linear_top1", "linear_val_top1"):
        assert alone[key] == grid[key], key


def test_step_schedule_drops_the_lr_at_each_milestone():
    from invprop.eval.linear_world import lr_schedule

    lin = OmegaConf.create({"schedule": "step", "milestones": [50, 80, 100], "gamma": 0.1})
    assert [lr_schedule(lin, e, 0, 1) for e in (0, 49.9, 50, 80, 99, 100, 119)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.01, 0.001, 0.001])


# -- label subsets ------------------------------------------------------------------------------------------


def test_fraction_tags():
    assert [fraction_tag(f) for f in (0.01, 0.1, 0.005, 1.0)] == ["1pct", "10pct", "0.5pct", "100pct"]
    with pytest.raises(ValueError):
        fraction_tag(0)


def test_balanced_subsets_are_balanced_deterministic_and_nested():
    # Unequal class sizes (300, 200, 500): a balanced subset takes the same number from each.
    labels = torch.cat([torch.full((300,), 0), torch.full((200,), 1), torch.full((500,), 2)])
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    small, big = balanced_subset(labels, 0.03, seed=0), balanced_subset(labels, 0.3, seed=0)
    assert torch.bincount(labels[small], minlength=3).tolist() == [10, 10, 10]
    assert torch.bincount(labels[big], minlength=3).tolist() == [100, 100, 100]
    assert len(set(small.tolist())) == 30 and set(small.tolist()) <= set(big.tolist())
    assert torch.equal(small, balanced_subset(labels, 0.03, seed=0))
    assert not torch.equal(small, balanced_subset(labels, 0.03, seed=1))
    # A class smaller than its share gives all it has; every class gets at least one.
    tiny = balanced_subset(labels, 0.001, seed=0)
    assert torch.bincount(labels[tiny], minlength=3).tolist() == [1, 1, 1]


def test_subset_files_are_written_once_and_reused(tmp_path):
    labels = torch.arange(400) % 4
    path = subset_path(tmp_path, 0.1, 7)
    assert path == tmp_path / "subsets" / "labels_10pct_seed7.txt"
    first = load_or_create_subset(tmp_path, labels, 0.1, 7)
    assert path.read_text().split() == [str(i) for i in first.tolist()]
    assert not list(path.parent.glob(".*"))  # no temporary files left
    edited = torch.tensor([3, 1, 2, 0])
    path.write_text("# hand-picked\n" + "".join(f"{i}\n" for i in edited.tolist()))
    assert torch.equal(load_or_create_subset(tmp_path, labels, 0.1, 7), edited)  # read back, not redrawn
    write_subset(path, torch.tensor([5, 400]))
    with pytest.raises(ValueError, match="outside"):
        read_subset(path, 400)


# -- semi-supervised fine-tuning ----------------------------------------------------------------------------


def test_milestones_scale_with_epochs():
    assert scaled_milestones([15, 20, 25], 30, 30) == [15, 20, 25]
    assert scaled_milestones([15, 20, 25], 30, 60) == [30, 40, 50]
    assert scaled_milestones([15, 20, 25], 30, 3) == [1.5, 2.0, 2.5]
    assert scaled_milestones([5, 8], None, 3) == [5, 8]
    steps = [15, 20, 25]
    assert [milestone_factor(p, steps, 0.1) for p in (0, 14.9, 15, 19.99, 20, 25, 29.9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])


def test_classifier_learns_fifty_times_faster():
    net = FineTuneNet(torch.nn.Sequential(torch.nn.Linear(4, 8)), 8, 3)
    opt = finetune_optimizer(net, 0.01, 50, 0.9, 5e-4)
    backbone, head = opt.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in net.classifier.parameters()}
    assert {id(p) for p in backbone["params"]} == {id(p) for p in net.backbone.parameters()}
    assert backbone["lr"] == pytest.approx(0.01) and head["lr"] == pytest.approx(0.5)


def test_semisup_writes_and_reuses_subsets_and_leaves_the_model_alone(tmp_path):
    cfg = _cfg(semisup={"epochs": 1, "batch_size": 16, "fractions": [0.05, 0.2]})
    model = _model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = _semisup(cfg, model, tmp_path)
    for tag, n in (("5pct", 8), ("20pct", 40)):  # 200 images, 4 classes: 2 and 10 per class
        assert 0.0 <= out[f"semisup_{tag}_top1"] <= out[f"semisup_{tag}_top5"] <= 1.0
        assert out[f"semisup_{tag}_labels"] == n
        assert len(read_subset(tmp_path / "subsets" / f"labels_{tag}_seed0.txt")) == n
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A rerun trains on the list file as it is on disk.
    write_subset(subset_path(tmp_path, 0.05, 0), torch.arange(6))
    cfg.eval.semisup.augment = "none"
    again = finetune_world(cfg, model, Comm(), tmp_path, 0.05, *_splits(cfg))
    assert again["semisup_5pct_labels"] == 6


def test_semisup_finetuning_learns():
    # All labels, no augmentation, a few epochs: far above chance (0.25) on the synthetic classes.
    cfg = _cfg()
    cfg.data.n_train = 128
    model = _model(cfg)
    cfg = OmegaConf.merge(cfg, {"eval": {"semisup": {"epochs": 4, "milestones": [3], "milestones_epochs": 0,
                                                     "batch_size": 16, "augment": "none", "lr": 0.05}}})
    with tempfile.TemporaryDirectory() as run_dir:
        out = finetune_world(cfg, model, Comm(), run_dir, 1.0, *_splits(cfg))
    assert out["semisup_100pct_top1"] > 0.6


# -- results.json under concurrent writers ------------------------------------------------------------------


def _writer(run_dir, name, barrier, rounds):
    barrier.wait()
    for i in range(rounds):
        update_results(run_dir, {f"{name}_{i}": i})


def test_concurrent_update_results_keeps_every_key(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(tmp_path, name, barrier, 60)) for name in ("knn", "linear")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {f"{name}_{i}" for name in ("knn", "linear") for i in range(60)}


def test_pixel_vectors_drop_replicated_grey_and_find_exact_copies() -> None:
    gen = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=gen)
    rgb = grey.expand(-1, 3, -1, -1).contiguous()
    vec = pixel_vectors(rgb, torch.device("cpu"))
    assert vec.shape == (50, 64)  # one channel, not three copies of it
    torch.testing.assert_close(vec, torch.nn.functional.normalize(grey.reshape(50, -1).float(), dim=1))
    labels = torch.arange(50) % 5
    assert knn_top1(vec, labels, vec, labels, 5, k=1) == 1.0  # each image's nearest reference is itself
    colour = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    assert pixel_vectors(colour, torch.device("cpu")).shape == (4, 192)


# -- progress in a job log ----------------------------------------------------------------------------------


def test_each_protocol_reports_its_passes_and_epochs_without_changing_its_results(tmp_path):
    """Plain lines (no terminal) for kNN's feature passes, the probe's features and steps, the fine-tune's
    steps and test pass, all on the world functions (one rank); a still clock, so every line is its loop's last
    (or an epoch's end)."""
    cfg = _cfg(linear={"epochs": 3, "batch_size": 64, "lrs": [0.1], "val_fraction": 0.0},
               semisup={"epochs": 2, "batch_size": 16, "fractions": [0.2], "augment": "none"})
    model = _model(cfg)
    out = io.StringIO()
    report = Reporter(console=Console(file=out, force_terminal=False, width=200), clock=lambda: 0.0)
    bank = ShardedBank(200, 16)
    assert _knn(cfg, model, bank, report)["knn_top1"] == _knn(cfg, model, bank)["knn_top1"]
    assert _linear(cfg, model, report)["linear_head_digest"] == _linear(cfg, model)["linear_head_digest"]
    told, silent = _semisup(cfg, model, tmp_path, report), _semisup(cfg, model, tmp_path)
    assert told["semisup_20pct_digest"] == silent["semisup_20pct_digest"]
    lines = [re.sub(r"loss \d+\.\d{4}$", "loss L", line) for line in out.getvalue().splitlines()]
    assert lines == [
        "knn features test img 100/100 100.0%  ? img/s  done in 0s",
        "knn features train img 200/200 100.0%  ? img/s  done in 0s",
        "linear features train img 200/200 100.0%  ? img/s  done in 0s",
        # 200 images in global batches of 64: 3 steps per epoch (the partial batch dropped)
        "linear probe step 3/9 (epoch 1/3) 33.3%  ? step/s  ETA ?  loss L",
        "linear probe step 6/9 (epoch 2/3) 66.7%  ? step/s  ETA ?  loss L",
        "linear probe step 9/9 (epoch 3/3) 100.0%  ? step/s  done in 0s  loss L",
        "linear lr 0.1 chosen",
        "linear features test img 100/100 100.0%  ? img/s  done in 0s",
        # 40 labels (10 per class) in batches of 16: 2 steps per epoch (the partial batch dropped)
        "semisup 20pct step 2/4 (epoch 1/2) 50.0%  ? step/s  ETA ?  loss L",
        "semisup 20pct step 4/4 (epoch 2/2) 100.0%  ? step/s  done in 0s  loss L",
        "semisup 20pct test img 100/100 100.0%  ? img/s  done in 0s",
    ]
