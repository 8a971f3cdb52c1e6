"""Run outputs: metrics as JSON lines, and results.json merged safely by concurrent evaluation jobs."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any, Protocol

from invprop.atomic import write_json_atomic, write_text_atomic

__all__ = ["MetricsLog", "read_jsonl", "update_results", "write_json_atomic"]  # write_json_atomic: re-exported


def update_results(run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into run_dir/results.json under an exclusive lock, keeping every other job's keys."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.json"
    with open(run_dir / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(values)
        write_json_atomic(path, current)
    return current


class ScalarMirror(Protocol):
    """A live logger fed the same records (invprop.logger)."""

    def record(self, record: dict[str, Any]) -> None: ...

    def resume_after(self, step: int) -> None: ...


class MetricsLog:
    """Appends one JSON object per line; only the main rank writes. The single place scalars are written:
    `mirror` (TensorBoard, wandb) gets every record right after its line, and the resume truncation."""

    def __init__(self, path: Path, enabled: bool = True, mirror: ScalarMirror | None = None) -> None:
        self.path, self.enabled, self.mirror = Path(path), enabled, mirror
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
        if self.mirror is not None:
            self.mirror.record(record)

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step` (written after the checkpoint a resumed run restarts from)."""
        if self.enabled and self.mirror is not None:
            self.mirror.resume_after(step)
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if _step(line) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))


def _step(line: str) -> float:
    """The step of one metrics line; a line a killed writer left half-written sorts after every step."""
    try:
        return json.loads(line).get("step", -1)
    except ValueError:
        return float("inf")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
