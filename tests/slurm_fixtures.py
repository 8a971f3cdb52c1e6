"""The local SLURM cluster (slurm/local-cluster.sh) as a pytest fixture, plus small sbatch/sacct helpers.

Use it from a conftest with ``from slurm_fixtures import slurm_cluster  # noqa: F401`` (tests/ is on sys.path
under pytest's default import mode), or call :func:`ensure_cluster` from a fixture of your own.

The fixture checks ``slurm/local-cluster.sh status``; when the cluster is not (fully) up it runs ``up``. It skips
the test with the reason when Slurm is not installed, when not running as root, when ``up`` fails, or when
``make test`` already found that the cluster cannot start (``INVPROP_SLURM_UNAVAILABLE``, set by
``local-cluster.sh test-env``) -- unless ``INVPROP_SLURM_REQUIRED=1`` is set (CI), in which case those become
failures. It also exports ``SLURM_CONF`` in this process, so that submitit (which calls sbatch/sacct/scancel) and
every command the tests start talk to this checkout's cluster, never to the machine's own SLURM.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def state_dir() -> Path:
    return Path(os.environ.get("INVPROP_SLURM_STATE", REPO / "slurm" / "state")).resolve()


@dataclasses.dataclass(frozen=True)
class LocalSlurm:
    """Handle on the running local cluster."""

    slurm_conf: Path
    state: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def sbatch(self, *args: str, script: str | None = None, cwd: Path | None = None) -> str:
        """Submit (``sbatch --parsable ARGS``, the script on stdin if given); returns the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            input=script,
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def sacct(self, job_id: str) -> dict[str, str]:
        """The allocation record of a job (``sacct -X``), or {} when the database does not know it yet."""
        fields = ["JobID", "State", "ExitCode", "Submit", "Start", "End", "Elapsed", "NodeList", "Reason"]
        proc = self.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", ",".join(fields), check=False)
        for line in proc.stdout.splitlines():
            values = line.split("|")
            if len(values) == len(fields) and values[0] == job_id:
                record = dict(zip(fields, values, strict=True))
                # "CANCELLED by 0" -> "CANCELLED"
                record["State"] = record["State"].split()[0] if record["State"] else ""
                return record
        return {}

    def squeue(self, job_id: str) -> tuple[str, str] | None:
        """(state, reason) while slurmctld still holds the job, else None."""
        proc = self.run("squeue", "-h", "-j", job_id, "-o", "%T|%r", check=False)
        line = proc.stdout.strip()
        if proc.returncode != 0 or not line:
            return None
        state, _, reason = line.partition("|")
        return state, reason

    def wait_sacct(self, job_id: str, states: set[str] | None = None, timeout: float = 60) -> dict[str, str]:
        """Poll sacct until the job is in one of ``states`` (default: any finished state)."""
        wanted = states or FINISHED_STATES
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.sacct(job_id)
            if record.get("State") in wanted:
                return record
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s; last sacct record: {record}")


def _unavailable(reason: str) -> None:
    if os.environ.get("INVPROP_SLURM_REQUIRED", "") not in ("", "0"):
        pytest.fail(f"local SLURM cluster required (INVPROP_SLURM_REQUIRED=1) but unavailable: {reason}")
    pytest.skip(f"local SLURM cluster unavailable: {reason}")


_CLUSTER: LocalSlurm | None = None


def ensure_cluster(up_timeout: float = 110) -> LocalSlurm:
    """Return the running local cluster, starting it if needed (cached for the session)."""
    global _CLUSTER
    if _CLUSTER is not None:
        return _CLUSTER
    if os.environ.get("INVPROP_SLURM_UNAVAILABLE"):
        _unavailable(os.environ["INVPROP_SLURM_UNAVAILABLE"])
    missing = [
        p
        for p in ("sbatch", "sacct", "slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")
        if shutil.which(p) is None and not Path("/usr/sbin", p).exists()
    ]
    if missing:
        _unavailable(
            f"missing {', '.join(missing)}; install: apt-get install --no-install-recommends "
            "munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
        )
    if os.geteuid() != 0:
        _unavailable("slurm/local-cluster.sh runs the daemons as root; run the tests as root")
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    if status.returncode != 0:
        try:
            up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=up_timeout)
        except subprocess.TimeoutExpired:
            _unavailable(f"'{SCRIPT} up' did not finish within {up_timeout}s")
        if up.returncode != 0:
            errors = [ln for ln in up.stderr.splitlines() if ln.startswith("[local-cluster] ERROR: ")]
            tail = "\n".join((up.stdout + up.stderr).strip().splitlines()[-40:])
            first = errors[0].removeprefix("[local-cluster] ERROR: ") if errors else f"exit {up.returncode}"
            _unavailable(f"'{SCRIPT} up' failed: {first}\n{tail}")
    conf = state_dir() / "etc" / "slurm.conf"
    if not conf.is_file():
        _unavailable(f"{conf} missing after 'up'")
    os.environ["SLURM_CONF"] = str(conf)  # submitit's sbatch/sacct/scancel calls inherit it
    _CLUSTER = LocalSlurm(slurm_conf=conf, state=state_dir())
    return _CLUSTER


@pytest.fixture(scope="session")
def slurm_cluster() -> LocalSlurm:
    """The local SLURM cluster, up (started on demand); skips when it cannot be started."""
    return ensure_cluster()
