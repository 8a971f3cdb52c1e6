"""slurm/local-cluster.sh leaves the machine alone: /etc/slurm is never written by default, `up` checks ports and
the clusters of other checkouts before changing anything, a failed `up` stops what it started, and two checkouts'
clusters run side by side on different ports.

A "second checkout" is a copy of slurm/ (script + templates) under a short /tmp folder, so its state folder, and
everything it writes, lies inside that copy. The tests snapshot /etc/slurm around every call.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_fixtures import SCRIPT, LocalSlurm

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]
ETC_SLURM = Path("/etc/slurm")
SYSTEM_CONF = ETC_SLURM / "slurm.conf"


# ---------------------------------------------------------------------------------------------------------------
def etc_snapshot() -> dict[str, tuple]:
    """Every entry under /etc/slurm: type, mode, inode, mtime and content hash (or link target)."""
    if not ETC_SLURM.exists():
        return {}
    snap = {}
    for path in [ETC_SLURM, *sorted(ETC_SLURM.rglob("*"))]:
        st = path.lstat()
        if path.is_symlink():
            what = ("link", os.readlink(path))
        elif path.is_file():
            what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            what = ("dir", "")
        snap[str(path)] = (*what, st.st_mode, st.st_ino, st.st_mtime_ns)
    return snap


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment contains ``text`` (a state folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(proc.name + ": " + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    """Whether any TCP socket listens on ``port`` (TIME_WAIT leftovers of closed connections do not count)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def free_ports(nodes: int) -> dict[str, str]:
    """Settings putting a cluster of ``nodes`` nodes on free ports (a block that depends on this process's id, so
    that checkouts testing at the same time look in different places first)."""
    for attempt in range(200):
        base = 20000 + ((os.getpid() + attempt * 37) % 400) * 20
        ports = [base, base + 1, base + 2, *range(base + 3, base + 3 + nodes)]
        if all(port_is_free(p) for p in ports):
            return {"INVPROP_SLURM_DB_PORT": str(base), "INVPROP_SLURM_DBD_PORT": str(base + 1),
                    "INVPROP_SLURM_CTLD_PORT": str(base + 2), "INVPROP_SLURM_SLURMD_PORT": str(base + 3)}
    raise RuntimeError("no free block of ports in 20000-28000")


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any INVPROP_SLURM_* / SLURM_CONF, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVPROP_SLURM_") and k != "SLURM_CONF"}
    return {**env, **settings}


def cluster_ports(cluster: LocalSlurm) -> dict[str, str]:
    """The ports the running cluster was started with, from its generated configs."""
    conf = dict(line.split("=", 1) for line in cluster.slurm_conf.read_text().splitlines()
                if "=" in line and not line.startswith("#") and " " not in line.split("=", 1)[0])
    node_line = next(ln for ln in cluster.slurm_conf.read_text().splitlines() if ln.startswith("NodeName="))
    slurmd = next(f for f in node_line.split() if f.startswith("Port=")).split("=")[1].split("-")[0]
    db = next(ln for ln in (cluster.slurm_conf.parent / "my.cnf").read_text().splitlines() if ln.startswith("port="))
    return {"INVPROP_SLURM_DB_PORT": db.split("=")[1], "INVPROP_SLURM_DBD_PORT": conf["AccountingStoragePort"],
            "INVPROP_SLURM_CTLD_PORT": conf["SlurmctldPort"], "INVPROP_SLURM_SLURMD_PORT": slurmd}


class Checkout:
    """A second checkout's slurm/ folder: its own script, templates and state folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.script = root / "slurm" / "local-cluster.sh"
        self.state = root / "slurm" / "state"
        self.env: dict[str, str] = clean_env()

    def run(self, *args: str, **settings: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.script), *args], env={**self.env, **settings},
                              capture_output=True, text=True, timeout=150)


@pytest.fixture
def second_checkout() -> Iterator[Checkout]:
    # short path: socket paths under the state folder must stay below ~100 characters
    root = Path(tempfile.mkdtemp(prefix="ivs", dir="/tmp"))
    (root / "slurm").mkdir()
    shutil.copy2(SCRIPT, root / "slurm" / "local-cluster.sh")
    shutil.copytree(SCRIPT.parent / "templates", root / "slurm" / "templates")
    checkout = Checkout(root)
    try:
        yield checkout
    finally:
        if (checkout.state / "run").exists():
            checkout.run("down")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def foreign_etc_conf() -> Iterator[Path]:
    """/etc/slurm/slurm.conf as on a machine with its own SLURM: a plain file made here and removed after (an
    existing one is used as it is and never modified)."""
    made_dir = not ETC_SLURM.exists()
    made_file = not (SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink())
    times = None if made_dir else (ETC_SLURM.stat().st_atime_ns, ETC_SLURM.stat().st_mtime_ns)
    if made_file:
        ETC_SLURM.mkdir(exist_ok=True)
        SYSTEM_CONF.write_text("# made by tests/test_local_cluster_isolation.py: a machine's own SLURM\n"
                               "ClusterName=site\nSlurmctldHost=site-controller\n")
    try:
        yield SYSTEM_CONF
    finally:
        if made_file and SYSTEM_CONF.is_file() and not SYSTEM_CONF.is_symlink():
            SYSTEM_CONF.unlink()
            if times is not None:
                os.utime(ETC_SLURM, ns=times)  # the folder's timestamps too: as it was found
        if made_dir:
            shutil.rmtree(ETC_SLURM, ignore_errors=True)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused `up` prints (asserting it is exactly one)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
def test_up_never_touches_an_existing_etc_slurm_conf(slurm_cluster: LocalSlurm, foreign_etc_conf: Path) -> None:
    before = etc_snapshot()
    env = {k: v for k, v in os.environ.items() if k != "INVPROP_SLURM_INSTALL_ETC"}
    up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert up.stdout == f"export SLURM_CONF={slurm_cluster.slurm_conf}\n"
    assert f"note: this machine has its own SLURM configuration ({SYSTEM_CONF}); it is left alone" in up.stderr
    assert etc_snapshot() == before
    # the explicit opt-in is refused, in one line, before anything changes
    refused = subprocess.run(["bash", str(SCRIPT), "up"], env={**env, "INVPROP_SLURM_INSTALL_ETC": "1"},
                             capture_output=True, text=True, timeout=120)
    line = error_line(refused)
    assert line.startswith(f"[local-cluster] ERROR: INVPROP_SLURM_INSTALL_ETC=1 refused: {SYSTEM_CONF} exists and "
                           "is not this checkout's ("), line
    assert line.endswith('so it is left alone; run without INVPROP_SLURM_INSTALL_ETC and point commands at this '
                         f'cluster with: eval "$({SCRIPT} env)"'), line
    assert etc_snapshot() == before
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout


def test_install_etc_refused_while_another_slurmctld_runs(slurm_cluster: LocalSlurm,
                                                          second_checkout: Checkout) -> None:
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        pytest.skip(f"{SYSTEM_CONF} exists: the opt-in is refused for that first (see the test above)")
    before = etc_snapshot()
    ctld_pid = (slurm_cluster.state / "run" / "slurmctld.pid").read_text().strip()
    proc = second_checkout.run("up", INVPROP_SLURM_INSTALL_ETC="1", **free_ports(2))
    assert error_line(proc) == (
        "[local-cluster] ERROR: INVPROP_SLURM_INSTALL_ETC=1 refused: a slurmctld not started by this checkout is "
        f"running (pid {ctld_pid} of the local cluster in {slurm_cluster.state}), so /etc/slurm is left alone; run "
        "without INVPROP_SLURM_INSTALL_ETC and point commands at this cluster with: "
        f'eval "$({second_checkout.script} env)"')
    assert etc_snapshot() == before
    assert not (second_checkout.state / "etc").exists()  # refused before generating anything
    assert processes_mentioning(str(second_checkout.root)) == []


def test_install_etc_opt_in_links_our_config(slurm_cluster: LocalSlurm) -> None:
    """The explicit opt-in on a test box: /etc/slurm/slurm.conf becomes a symlink to this checkout's config (the
    test removes it again, as `down` does)."""
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        pytest.skip(f"{SYSTEM_CONF} exists: the opt-in is refused (see test_up_never_touches_...)")
    times = (ETC_SLURM.stat().st_atime_ns, ETC_SLURM.stat().st_mtime_ns) if ETC_SLURM.exists() else None
    env = {**os.environ, "INVPROP_SLURM_INSTALL_ETC": "1"}
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        assert os.readlink(SYSTEM_CONF) == str(slurm_cluster.slurm_conf)
    finally:
        if SYSTEM_CONF.is_symlink() and os.readlink(SYSTEM_CONF) == str(slurm_cluster.slurm_conf):
            SYSTEM_CONF.unlink()
        if times is not None:
            os.utime(ETC_SLURM, ns=times)


def test_port_held_by_a_listening_socket_fails_up_in_one_line_changing_nothing(slurm_cluster: LocalSlurm,
                                                                              second_checkout: Checkout) -> None:
    ports = free_ports(2)
    node2_port = int(ports["INVPROP_SLURM_SLURMD_PORT"]) + 1
    before = etc_snapshot()
    first_cluster_files = sorted((p, p.stat().st_mtime_ns) for p in (slurm_cluster.state / "run").iterdir())
    me = Path(os.readlink("/proc/self/exe")).name.removesuffix(" (deleted)")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", node2_port))
        holder.listen()
        proc = second_checkout.run("up", **ports)
        line = error_line(proc)
        assert line.startswith(
            f"[local-cluster] ERROR: port {node2_port} (slurmd node2, INVPROP_SLURM_SLURMD_PORT+1) is already in use "
            f"by {me} (pid {os.getpid()}); give this cluster free ports: INVPROP_SLURM_DB_PORT="), line
        assert line.endswith(f" {second_checkout.script} up"), line
        # `make test` outside CI: one line saying why, and the reason for the skipped cluster tests
        shown = subprocess.run(
            ["bash", "-c", f'eval "$(bash {second_checkout.script} test-env)"; printf %s "$INVPROP_SLURM_UNAVAILABLE"'],
            env={**second_checkout.env, **ports}, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout == line.removeprefix("[local-cluster] ERROR: "), shown
        assert shown.stderr.strip().splitlines() == [
            f"[local-cluster] the local SLURM cluster did not start, so its tests will be skipped: {shown.stdout} "
            f"(full output: {second_checkout.state}/log/up.out)"]
        # CI: the same is an error
        required = second_checkout.run("test-env", INVPROP_SLURM_REQUIRED="1", **ports)
        assert required.returncode == 1 and required.stdout == ""
        assert required.stderr.strip().splitlines()[-1].startswith(
            "[local-cluster] ERROR: INVPROP_SLURM_REQUIRED=1: the cluster tests must run, but the local SLURM "
            f"cluster did not start: port {node2_port} (slurmd node2"), required.stderr
    assert etc_snapshot() == before
    assert not (second_checkout.state / "etc").exists()
    assert processes_mentioning(str(second_checkout.root)) == []
    assert sorted((p, p.stat().st_mtime_ns) for p in (slurm_cluster.state / "run").iterdir()) == first_cluster_files


def test_second_checkout_on_the_same_ports_names_the_first(slurm_cluster: LocalSlurm,
                                                           second_checkout: Checkout) -> None:
    before = etc_snapshot()
    ports = cluster_ports(slurm_cluster)
    line = error_line(second_checkout.run("up", **ports))
    db_pid = (slurm_cluster.state / "run" / "mariadb.pid").read_text().strip()
    nodes = int(slurm_cluster.run("sinfo", "-h", "-o", "%D").stdout.split()[0])
    taken = 2 + nodes  # slurmdbd, slurmctld and one slurmd a node, besides mariadb's
    assert line.startswith(
        f"[local-cluster] ERROR: port {ports['INVPROP_SLURM_DB_PORT']} (mariadb, INVPROP_SLURM_DB_PORT) is already "
        f"in use by mariadbd (pid {db_pid}) of the local cluster of another checkout (state {slurm_cluster.state}), "
        f"and {taken} more of this cluster's ports are taken; stop that cluster ({SCRIPT} down) or give this cluster "
        "free ports: INVPROP_SLURM_DB_PORT="), line
    assert etc_snapshot() == before
    assert processes_mentioning(str(second_checkout.root)) == []


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_checkouts_clusters_run_side_by_side(slurm_cluster: LocalSlurm, second_checkout: Checkout,
                                                 foreign_etc_conf: Path, tmp_path: Path) -> None:
    before = etc_snapshot()
    ports = free_ports(1)
    second_checkout.env.update(ports, INVPROP_SLURM_NODES="1", INVPROP_SLURM_CLUSTER="invpropb")
    up = second_checkout.run("up")
    conf = second_checkout.state / "etc" / "slurm.conf"
    assert up.returncode == 0, up.stderr
    assert up.stdout == f"export SLURM_CONF={conf}\n"
    assert (f"note: the local cluster of another checkout is up too (state {slurm_cluster.state}, slurmctld port "
            f"{cluster_ports(slurm_cluster)['INVPROP_SLURM_CTLD_PORT']}); they share no port") in up.stderr
    env = second_checkout.run("env")
    assert env.stdout == f"export SLURM_CONF={conf}\n"
    second = LocalSlurm(slurm_conf=conf, state=second_checkout.state)
    first_name = next(ln.split("=", 1)[1] for ln in slurm_cluster.slurm_conf.read_text().splitlines()
                      if ln.startswith("ClusterName="))
    script = "#!/bin/bash\necho \"$SLURM_CLUSTER_NAME $SLURMD_NODENAME\"\n"
    jobs = {}
    for name, cluster in (("first", slurm_cluster), ("second", second)):
        jobs[name] = cluster.sbatch("--time=2", f"--job-name=iso-{name}-{tmp_path.name}",
                                    f"--output={tmp_path}/{name}.out", script=script)
    for name, cluster in (("first", slurm_cluster), ("second", second)):
        assert cluster.wait_sacct(jobs[name], timeout=60)["State"] == "COMPLETED"
    assert (tmp_path / "first.out").read_text().split()[0] == first_name
    assert (tmp_path / "second.out").read_text().split() == ["invpropb", "node1"]
    # each cluster's accounting holds its own job, under its own cluster name
    for name, cluster, cluster_name in (("first", slurm_cluster, first_name), ("second", second, "invpropb")):
        rows = cluster.run("sacct", "-X", "-n", "-P", "-j", jobs[name], "-o", "Cluster,State").stdout.split()
        assert rows == [f"{cluster_name}|COMPLETED"], (name, rows)
    down = second_checkout.run("down")
    assert down.returncode == 0, down.stderr
    assert processes_mentioning(str(second_checkout.root)) == []
    assert subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0
    assert etc_snapshot() == before


@pytest.mark.slow
def test_failed_up_stops_what_it_started(slurm_cluster: LocalSlurm, second_checkout: Checkout) -> None:
    """A port bound but not listening is invisible to the port check; slurmctld then dies at start-up, after
    munged, MariaDB and slurmdbd were started: `up` stops exactly those and leaves no process behind."""
    before = etc_snapshot()
    ports = free_ports(1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(ports["INVPROP_SLURM_CTLD_PORT"])))
        proc = second_checkout.run("up", INVPROP_SLURM_NODES="1", **ports)
    assert proc.returncode == 1
    assert "[local-cluster] ERROR: slurmctld exited during start-up" in proc.stderr.splitlines()
    assert proc.stderr.strip().splitlines()[-1] == (
        "[local-cluster] stopping what this failed up started: munged mariadb slurmdbd slurmctld")
    assert processes_mentioning(str(second_checkout.root)) == []
    assert sorted(p.name for p in (second_checkout.state / "run").iterdir()) == ["script"]
    assert not any(listening(int(p)) for p in ports.values())
    assert etc_snapshot() == before
