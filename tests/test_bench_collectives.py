"""tools/bench_collectives.py: the step's byte model (docs/SCALING.md) and a real gloo measurement at W = 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    # imported by name from tools/ (not from a file spec): the spawned ranks unpickle its worker by module name,
    # and spawn hands them this sys.path
    sys.path.insert(0, str(ROOT / "tools"))
    return importlib.import_module("bench_collectives")


def test_step_bytes_follow_the_gathered_batch() -> None:
    tool = _tool()
    rows = {c["what"]: c for c in tool.step_collectives(8, batch=256, dim=128, k=4, cands=84, params=1000)}
    q = 8 * 256
    assert rows["embeddings z (batch x D float32)"]["bytes"] == 256 * 128 * 4  # per rank, independent of W
    hist = rows["exact M-th score: radix histograms (Q x 16 int32), 8 rounds"]
    assert (hist["bytes"], hist["calls"]) == (q * 64, 8)  # grows with the gathered batch
    assert rows["DDP: backbone gradients (float32)"]["bytes"] == 4000
    # ring: an all_gather sends (W-1) payloads per rank, an all_reduce 2 (W-1)/W of its tensor, none at W = 1
    assert tool.ring_bytes("all_gather", 100, 8) == 700 and tool.ring_bytes("all_reduce", 800, 8) == 1400
    assert tool.ring_bytes("all_reduce", 800, 1) == 0
    assert tool.ring_bytes("reduce_scatter", 800, 8) == 700 == tool.ring_bytes("all_to_all", 800, 8)
    assert tool.model_ms(1, 0.1, 10.0) == {"bank_ms": 0.0, "ddp_ms": 0.0}


@pytest.mark.timeout(300)
def test_the_model_matches_the_bytes_counted_on_a_real_step(tmp_path: Path) -> None:
    """Every collective call of one real InvP step at W = 4 is counted (invprop.collectives.TRAFFIC); the
    model of docs/SCALING.md must agree up to the packed pair scores' padding (the largest owner's count).
    The tool runs in a fresh interpreter: it forks its ranks, which a process whose autograd engine has
    started threads (this test process, after other tests) cannot do."""
    tool = _tool()
    out = tmp_path / "counted.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_collectives.py"), "--counted", "4",
                           "--counted-batch", "8", "--out", str(out)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())["4"]
    assert found["max_grad_error_vs_dense"] < 1e-6  # the counted step is the exact one
    model = tool.bank_sent_mb(4, batch=8) * 256 / 8
    assert model <= found["counted_mb"] <= 1.15 * model, (found, model)
    # 8 radix rounds, 4 + 2 logsumexp terms, the narrow selection's flags
    assert found["calls"] == {"all_gather": 4, "all_reduce": 15, "all_to_all": 2, "reduce_scatter": 2}


def test_memory_per_rank_shards_the_bank_but_not_the_table() -> None:
    tool = _tool()
    small, large = tool.memory_per_rank(8), tool.memory_per_rank(256)
    assert small["bank_shard_float32"] == 160_146 * 128 * 4 and large["bank_shard_float32"] == 5005 * 128 * 4
    assert small["neighbour_table_int32"] == large["neighbour_table_int32"] == 1_281_167 * 16
    # every gathered query's narrow candidates, ~2M / W each: 2 x batch x M per rank whatever W
    assert large["local_top_m"] == 256 * 256 * 32 * 12 == 2 * 256 * 4096 * 12
    assert small["local_top_m"] == 8 * 256 * 1024 * 12


class StepClock:
    """A clock (seconds) that advances by exactly `step` at every reading: every timed call lasts `step`."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.timeout(300)
def test_gloo_measurement_keeps_the_median_ms_of_every_payload(tmp_path: Path) -> None:
    """Real gloo collectives at W = 2, timed by a clock under the test's control: each op and payload gets the
    median of its timed calls in ms, and equal times fit no bandwidth (a flat line) with alpha = that time."""
    tool = _tool()
    found = tool.measure([2], reps=3, tmp=tmp_path, clock=StepClock(0.5))
    for op in ("all_gather", "all_reduce"):
        assert found["2"][op] == {"ms": {str(s): 500.0 for s in tool.SIZES}, "alpha_ms": 500.0, "gb_s": None}


def test_fit_recovers_latency_and_bandwidth() -> None:
    """t = alpha + ring bytes / bandwidth, exactly: the least-squares fit gives back alpha and the bandwidth."""
    tool = _tool()
    for op, world in (("all_gather", 2), ("all_reduce", 4)):
        times = {str(s): 0.25 + tool.ring_bytes(op, s, world) / 2e9 * 1e3 for s in tool.SIZES}
        fitted = tool.fit(times, op, world)
        assert fitted["alpha_ms"] == pytest.approx(0.25, rel=1e-9) and fitted["gb_s"] == pytest.approx(2.0, rel=1e-9)
    # one process: nothing crosses a wire, so no bandwidth, and alpha is the cheapest copy
    assert tool.fit({"4096": 0.5, "65536": 0.75}, "all_gather", 1) == {"alpha_ms": 0.5, "gb_s": None}
