"""User tools on real run directories: export_backbone, export_features, report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from invprop import checkpoint
from invprop.bank import ShardedBank
from invprop.config import group_section
from invprop.data import load_split, normalization
from invprop.models import build_backbone, build_model
from invprop.report.table import (
    PLOT_DPI,
    differing_keys,
    find_run_dirs,
    flatten,
    plot_figures,
    read_metrics,
    table_rows,
)

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ("data=synthetic", "data.n_train=256", "data.n_test=128", "train.epochs=2", "train.batch_size=64",
            "train.log_every=1", "eval.every_epochs=1", "train.num_workers=0")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two real one-process runs side by side (differing in method.k), like a sweep's run directories."""
    root = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs side by side: one thread each, no oversubscription
    procs = [subprocess.Popen([sys.executable, str(ROOT / "launchers/submit.py"), *RUN_ARGS, *extra,
                               f"out_dir={root / str(i)}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i, extra in enumerate([(), ("method.k=3",)])]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    return root


def _model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_state(checkpoint.latest(run_dir / "checkpoints"))["model"]


def test_export_backbone_reloads_strictly(sweep, tmp_path, capsys):
    tool = _tool("export_backbone")
    out = tmp_path / "backbone.pth"
    assert tool.main([str(sweep / "0"), "--out", str(out)]) == 0
    assert "resnet_tiny" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith(("head.", "backbone.")) for k in state)
    backbone, _ = build_backbone("resnet_tiny")
    backbone.load_state_dict(state, strict=True)
    saved = _model_state(sweep / "0")
    assert all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in state.items())
    assert len(state) == sum(k.startswith("backbone.") for k in saved)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    # --format invprop wraps the same tensors with their arch.
    wrapped = tmp_path / "wrapped.pth"
    assert tool.main([str(sweep / "0"), "--out", str(wrapped), "--format", "invprop"]) == 0
    meta = torch.load(wrapped, weights_only=True)
    assert meta["arch"] == "resnet_tiny" and meta["state_dict"].keys() == state.keys()


def test_export_backbone_resnet50_loads_into_torchvision(tmp_path):
    run = tmp_path / "r50"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({"model": {"arch": "resnet50", "head": "mlp", "embedding_dim": 128,
                                               "hidden_dim": 2048}}), run / "config.yaml")
    torch.manual_seed(0)
    model = build_model(group_section("model", "resnet50")).eval()
    with torch.no_grad():  # non-default BN statistics, so buffers are checked too
        model.backbone.bn1.running_mean.uniform_(-1, 1)
    checkpoint.save(run / "checkpoints", 1, {"model": model, "bank": ShardedBank(4, 128)})
    out = tmp_path / "r50.pth"
    assert _tool("export_backbone").main([str(run), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    tv = torchvision.models.resnet50()
    missing, unexpected = tv.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    tv.fc = torch.nn.Identity()
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), model.features(x))


def test_export_features_shapes_and_labels(sweep, tmp_path):
    tool = _tool("export_features")
    run = sweep / "1"
    cfg = OmegaConf.load(run / "config.yaml")
    model = build_model(cfg.model)
    model.load_state_dict(_model_state(run))
    model.eval()
    for split, n in (("train", 256), ("test", 128)):
        out = tmp_path / f"{split}.npz"
        assert tool.main([str(run), "--split", split, "--out", str(out), "--device", "cpu"]) == 0
        arrays = np.load(out)
        images, labels = load_split(cfg.data, split)
        assert arrays["features"].shape == (n, 128) and arrays["features"].dtype == np.float32
        np.testing.assert_array_equal(arrays["labels"], labels.numpy())
        assert str(arrays["checkpoint"]) == checkpoint.latest(run / "checkpoints").name
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(cfg.data))
        with torch.no_grad():
            expected = model.features((images[:4].float() / 255 - mean) / std)
        np.testing.assert_allclose(arrays["features"][:4], expected.numpy(), rtol=1e-4, atol=1e-5)
    emb = tmp_path / "emb.npz"
    assert tool.main([str(run), "--split", "test", "--out", str(emb), "--embedding"]) == 0
    np.testing.assert_allclose(np.linalg.norm(np.load(emb)["features"], axis=1), 1.0, rtol=1e-5)


def test_report_table_and_plots(sweep, tmp_path, capsys):
    runs = find_run_dirs(sweep)
    assert [r.name for r in runs] == ["0", "1"]
    steps, knn = read_metrics(runs[0])
    assert len(steps) == 8 and [r["epoch"] for r in knn] == [0, 1, 2]  # epoch 0: before the first step
    columns, rows = table_rows(runs)
    assert "method.k" in columns and "out_dir" not in columns and "knn_top1" in columns
    assert [(r["run"], r["method.k"]) for r in rows] == [("0", 4), ("1", 3)]
    assert all(isinstance(r["knn_top1"], float) for r in rows)

    tool = _tool("report")
    plots = tmp_path / "plots"
    assert tool.main([str(sweep), "--out", str(plots)]) == 0
    printed = capsys.readouterr().out
    assert "method.k" in printed and "knn_top1" in printed
    # what is drawn: each run's curve is its metrics.jsonl series, the baselines its results.json values
    figures = plot_figures(runs)
    assert set(figures) == {"losses.png", "knn.png", "purity.png"}
    for run, label in zip(runs, ("0", "1"), strict=True):
        steps, knn = read_metrics(run)
        (loss_ax,) = [ax for ax in figures["losses.png"].axes if ax.get_title() == "loss"]
        (line,) = [ln for ln in loss_ax.get_lines() if ln.get_label() == label]
        assert list(line.get_xdata()) == [r["step"] for r in steps]
        assert list(line.get_ydata()) == [r["loss"] for r in steps]
        knn_lines = [ln for ln in figures["knn.png"].axes[0].get_lines() if list(ln.get_xdata()) == [0, 1, 2]]
        assert [r["epoch_knn_top1"] for r in knn] in [list(ln.get_ydata()) for ln in knn_lines]
    hlines = {tuple(ln.get_ydata()) for ln in figures["knn.png"].axes[0].get_lines() if len(ln.get_xdata()) == 2}
    untrained = json.loads((runs[0] / "results.json").read_text())["knn_untrained_top1"]
    assert (round(untrained, 4),) * 2 in hlines  # drawn at 4 digits
    # the written PNGs decode to images of the figures' size
    import matplotlib.pyplot as plt  # after plot_figures chose the Agg backend

    for name, fig in figures.items():
        height, width = plt.imread(plots / name).shape[:2]
        assert (width, height) == tuple(round(v * PLOT_DPI) for v in fig.get_size_inches()), name
        plt.close(fig)
    # A single run gets its plots in the run directory; --json prints the rows (and plots nothing).
    assert tool.main([str(sweep / "1")]) == 0
    assert (sweep / "1" / "losses.png").exists() and not (sweep / "losses.png").exists()
    capsys.readouterr()
    assert tool.main([str(sweep / "0"), str(sweep / "1"), "--json"]) == 0
    rows_json = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["method.k"]) for r in rows_json] == [("0", 4), ("1", 3)]


def test_report_config_differences():
    a = flatten({"method": {"k": 4, "tau": 0.07}, "out_dir": "a", "train": {"lr": 0.03}})
    b = flatten({"method": {"k": 8, "tau": 0.07}, "out_dir": "b", "train": {"lr": 0.03, "extra": 1}})
    assert a == {"method.k": 4, "method.tau": 0.07, "out_dir": "a", "train.lr": 0.03}
    assert differing_keys([a, b]) == ["method.k", "train.extra"]
    assert differing_keys([a, a]) == []


def test_report_cli_without_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/report.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no run directory" in proc.stderr


def test_report_baselines_once_per_reference_set(tmp_path):
    from invprop.report.table import baselines

    runs = []
    for name, untrained in (("a", 0.55), ("b", 0.55), ("c", 0.61)):
        run = tmp_path / name
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"knn_untrained_top1": untrained, "knn_pixels_top1": 0.67}))
        runs.append(run)
    assert baselines(runs[:2]) == [("untrained network", 0.55, ":"), ("raw pixels", 0.67, "-.")]
    # Runs on different reference sets: one bar per value, labelled with it.
    assert sorted(label for label, _, _ in baselines(runs)) == [
        "raw pixels 67.0%", "untrained network 55.0%", "untrained network 61.0%"]


def test_report_markdown_rows_and_percentages():
    from invprop.report.table import render_markdown

    text = render_markdown(["run", "method.k", "knn_top1", "train_wall_s"],
                           [{"run": "0", "method.k": 4, "knn_top1": 0.6266, "train_wall_s": 78.6},
                            {"run": "a|b", "method.k": 8, "knn_top1": None, "train_wall_s": 80.2}])
    assert text.splitlines() == ["| run | method.k | knn_top1 | train_wall_s |", "|---|---|---|---|",
                                 "| 0 | 4 | 62.7% | 79 |", "| a\\|b | 8 | - | 80 |"]


def test_knn_legend_names_each_run_and_each_measure_once() -> None:
    """Eight runs x three measures would be 24 legend lines; the legend has 8 + 3 (+ the baselines) instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from invprop.report.table import _keyed_handles

    fig, ax = plt.subplots()
    ax.axhline(0.5, label="raw pixels")
    ax.plot([0, 1], [0.1, 0.2])  # unlabelled curves stay out of the legend
    handles = _keyed_handles(["run a", "run b"], ("epoch_knn_top1", "epoch_knn_backbone_top1"),
                             {"epoch_knn_backbone_top1": ":"}, ax)
    plt.close(fig)
    assert [h.get_label() for h in handles] == ["run a", "run b", "epoch_knn_top1", "epoch_knn_backbone_top1",
                                                "raw pixels"]
    assert [h.get_color() for h in handles[:2]] == ["C0", "C1"]
    assert [h.get_linestyle() for h in handles[2:4]] == ["-", ":"]
