"""Progress reporting: plain periodic lines with rate and ETA where stdout is no terminal (a job log), the rich bar
on a terminal, nothing on ranks other than the main one."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from invprop.progress import Reporter, format_duration, format_rate
from invprop.train.progress import TrainProgress

BAR = "━"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=120), out


def test_durations_and_rates_read_at_a_glance() -> None:
    assert [format_duration(s) for s in (0, 42.4, 59.6, 255, 3599, 3600, 7500, 90061)] == [
        "0s", "42s", "1m00s", "4m15s", "59m59s", "1h00m", "2h05m", "1d01h"]
    assert [format_rate(r) for r in (0.4123, 4.123, 41.23, 412.3, 4123.0)] == ["0.412", "4.12", "41.2", "412", "4123"]


def test_plain_lines_every_interval_with_the_recent_rate_and_eta() -> None:
    """40 steps at 0.5 s, then 60 at 1 s: a line every 10 s, the rate of the last 10 s, the ETA at that rate."""
    console, out = _console(terminal=False)
    clock = Clock()
    with Reporter(console=console, clock=clock, every_s=10).track("pretrain", 100) as progress:
        for step in range(1, 101):
            clock.t += 0.5 if step <= 40 else 1.0
            progress.update(step)
    assert out.getvalue().splitlines() == [
        "pretrain step 20/100 20.0%  2.00 step/s  ETA 40s",
        "pretrain step 40/100 40.0%  2.00 step/s  ETA 30s",
        "pretrain step 50/100 50.0%  1.00 step/s  ETA 50s",
        "pretrain step 60/100 60.0%  1.00 step/s  ETA 40s",
        "pretrain step 70/100 70.0%  1.00 step/s  ETA 30s",
        "pretrain step 80/100 80.0%  1.00 step/s  ETA 20s",
        "pretrain step 90/100 90.0%  1.00 step/s  ETA 10s",
        "pretrain step 100/100 100.0%  1.00 step/s  done in 1m20s",
    ]


def test_training_lines_at_each_epoch_end_carry_the_latest_monitors() -> None:
    """Epochs shorter than the interval: one line per epoch, with the record of the last logged window."""
    console, out = _console(terminal=False)
    clock = Clock()
    report = Reporter(console=console, clock=clock, every_s=30)
    with TrainProgress(24, 0, epoch_steps=8, report=report) as progress:
        for step in range(1, 25):
            clock.t += 0.25
            record = None
            if step % 5 == 0:
                record = {"loss": 7.2281, "loss_ins": 6.9, "loss_inv": step / 100, "lr": 0.03, "img_s": 1234.4}
            progress.update(step, record)
    assert out.getvalue().splitlines() == [
        "pretrain step 8/24 (epoch 1/3) 33.3%  4.00 step/s  ETA 4s  loss 7.228  ins 6.900  inv 0.050  lr 0.0300  "
        "1234 img/s",
        "pretrain step 16/24 (epoch 2/3) 66.7%  4.00 step/s  ETA 2s  loss 7.228  ins 6.900  inv 0.150  lr 0.0300  "
        "1234 img/s",
        "pretrain step 24/24 (epoch 3/3) 100.0%  4.00 step/s  done in 6s  loss 7.228  ins 6.900  inv 0.200  "
        "lr 0.0300  1234 img/s",
    ]
    assert BAR not in out.getvalue()


def test_a_resumed_run_counts_from_its_step_and_a_stopped_one_says_where_it_stopped() -> None:
    console, out = _console(terminal=False)
    clock = Clock()
    with Reporter(console=console, clock=clock, every_s=60).track("pretrain", 1000, done=400) as progress:
        for step in range(401, 441):
            clock.t += 2.0
            progress.update(step)
        progress.note("preempted [at step 440]")  # no markup: printed as it is
    assert out.getvalue().splitlines() == [
        "pretrain step 430/1000 43.0%  0.500 step/s  ETA 19m00s",
        "preempted [at step 440]",
        "pretrain step 440/1000 44.0%  0.500 step/s  ETA 18m40s",  # on leaving: where it stopped
    ]


def test_evaluation_units_and_lazy_info() -> None:
    """A feature pass counts images; an info callable (it may read a device value) is called only for a line."""
    console, out = _console(terminal=False)
    clock, calls = Clock(), []

    def info() -> str:
        calls.append(clock.t)
        return "loss 0.5"

    with Reporter(console=console, clock=clock, every_s=5).track("knn features test", 1000, unit="img") as progress:
        for _ in range(10):
            clock.t += 1.0
            progress.advance(100, info)
    assert out.getvalue().splitlines() == [
        "knn features test img 500/1000 50.0%  100 img/s  ETA 5s  loss 0.5",
        "knn features test img 1000/1000 100.0%  100 img/s  done in 10s  loss 0.5",
    ]
    assert calls == [5.0, 10.0]


def test_a_terminal_gets_the_bar_and_no_plain_lines() -> None:
    console, out = _console(terminal=True)
    clock = Clock()
    with Reporter(console=console, clock=clock, every_s=1).track("pretrain", 10) as progress:
        for step in range(1, 11):
            clock.t += 1.0
            progress.update(step, "loss 7.228")
        progress.note("bank top-M selection: topk")
    text = out.getvalue()
    assert BAR in text and "loss 7.228" in text and "bank top-M selection: topk" in text
    assert "step/s" not in text and "ETA" not in text


@pytest.mark.parametrize("terminal", [False, True])
def test_other_ranks_print_nothing(terminal: bool) -> None:
    console, out = _console(terminal)
    clock = Clock()
    with TrainProgress(10, 0, enabled=False, report=Reporter(console=console, clock=clock, every_s=1)) as progress:
        for step in range(1, 11):
            clock.t += 1.0
            progress.update(step, {"loss": 1.0, "lr": 0.1, "img_s": 10.0})
        progress.note("bank top-M selection: topk")
    assert out.getvalue() == ""
