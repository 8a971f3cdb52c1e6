#!/usr/bin/env bash
# A real SLURM cluster on this machine, for tests, CI and demos. It never writes outside its state folder by
# default: Slurm commands reach it through SLURM_CONF (`eval "$(slurm/local-cluster.sh env)"`), so a machine's own
# SLURM (/etc/slurm/slurm.conf, a site slurmctld) and the clusters of other checkouts are left alone.
#
#   slurm/local-cluster.sh up        start (or complete) the cluster; idempotent; waits until every node is usable.
#                                    Checks every port and the other local clusters first; a failed `up` stops what
#                                    it started and leaves the machine as it found it.
#   slurm/local-cluster.sh down      cancel all jobs, stop exactly the daemons `up` started (PID files)
#   slurm/local-cluster.sh status    print daemon states and sinfo; exit 0 healthy, 1 down, 2 degraded
#   slurm/local-cluster.sh env       print `export SLURM_CONF=...` (for a hand-typed sbatch/squeue/sacct)
#   slurm/local-cluster.sh test-env  `up` for `make test`: prints `export SLURM_CONF=...`, or, when the cluster
#                                    cannot start, one line saying why on stderr and `export
#                                    INVPROP_SLURM_UNAVAILABLE=<why>` (the cluster tests then skip with it);
#                                    with INVPROP_SLURM_REQUIRED=1 (CI) that is an error instead
#
# Components: munged (own key/socket), a private MariaDB (own datadir, 127.0.0.1:$DB_PORT), slurmdbd, slurmctld and
# one slurmd per node (node1..nodeN, all on this host). Everything runs as root; all state (configs generated from
# slurm/templates/, munge key, database, spool, logs, PID files) lives under one folder:
#   $INVPROP_SLURM_STATE (default: <this folder>/state).
# Settings (environment variables, read by `up`):
#   INVPROP_SLURM_NODES=4        number of nodes (node[1-N]; 4: the multi-node requeue test runs 4 x 2 ranks)
#   INVPROP_SLURM_CPUS=4         CPUs each node claims (oversubscribed through SlurmdParameters=config_overrides)
#   INVPROP_SLURM_MEM_MB=16384   RealMemory of each node (sbatch rejects --mem above it; 16 GiB fits mem_gb<=16)
#   INVPROP_SLURM_GPUS=0         fake GPUs per node (GRES gpu, device files made with mknod under state/dev)
#   INVPROP_SLURM_INSTALL_ETC=0  1: also make /etc/slurm/slurm.conf a symlink to the generated slurm.conf (plain
#                                sbatch then needs no SLURM_CONF). Refused when /etc/slurm/slurm.conf exists and is
#                                not that symlink, or when a slurmctld not started by this checkout runs; `down`
#                                removes the symlink.
#   INVPROP_SLURM_UP_TIMEOUT=90  seconds `up` waits for the nodes before failing with log tails
#   INVPROP_SLURM_DB_PORT=13306 INVPROP_SLURM_DBD_PORT=16819 INVPROP_SLURM_CTLD_PORT=16817
#   INVPROP_SLURM_SLURMD_PORT=17001 (first slurmd port; node i listens on port+i-1)
#   INVPROP_SLURM_CLUSTER=invprop  ClusterName
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$SCRIPT_DIR/templates"
STATE="${INVPROP_SLURM_STATE:-$SCRIPT_DIR/state}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd -P)"

NODES="${INVPROP_SLURM_NODES:-4}"
CPUS="${INVPROP_SLURM_CPUS:-4}"
MEM_MB="${INVPROP_SLURM_MEM_MB:-16384}"
GPUS="${INVPROP_SLURM_GPUS:-0}"
INSTALL_ETC="${INVPROP_SLURM_INSTALL_ETC:-0}"
UP_TIMEOUT="${INVPROP_SLURM_UP_TIMEOUT:-90}"
DB_PORT="${INVPROP_SLURM_DB_PORT:-13306}"
DBD_PORT="${INVPROP_SLURM_DBD_PORT:-16819}"
CTLD_PORT="${INVPROP_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${INVPROP_SLURM_SLURMD_PORT:-17001}"
CLUSTER="${INVPROP_SLURM_CLUSTER:-invprop}"
MIN_JOB_AGE="${INVPROP_SLURM_MIN_JOB_AGE:-30}"
HOST="$(hostname -s)"

ETC="$STATE/etc"
RUN="$STATE/run"
LOG="$STATE/log"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
SLURM_CONF_FILE="$ETC/slurm.conf"
DBD_CONF_FILE="$ETC/slurmdbd.conf"
MY_CNF="$ETC/my.cnf"
SYSTEM_CONF=/etc/slurm/slurm.conf
BACKUP_DIR="$STATE/backup"
export SLURM_CONF="$SLURM_CONF_FILE"

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { printf '[local-cluster] ERROR: %s\n' "$*" >&2; exit 1; }

for v in NODES CPUS MEM_MB GPUS DB_PORT DBD_PORT CTLD_PORT SLURMD_PORT UP_TIMEOUT MIN_JOB_AGE; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "INVPROP_SLURM_$v must be a non-negative integer, got '${!v}'"
done
((NODES >= 1)) || die "INVPROP_SLURM_NODES must be >= 1"
[[ "$INSTALL_ETC" == 0 || "$INSTALL_ETC" == 1 ]] || die "INVPROP_SLURM_INSTALL_ETC must be 0 or 1, got '$INSTALL_ETC'"
for v in DB_PORT DBD_PORT CTLD_PORT; do
    ((${!v} >= 1024 && ${!v} <= 65535)) || die "INVPROP_SLURM_$v must be a port in 1024-65535, got ${!v}"
done
((SLURMD_PORT >= 1024 && SLURMD_PORT + NODES - 1 <= 65535)) ||
    die "INVPROP_SLURM_SLURMD_PORT must leave room for $NODES ports below 65536, got $SLURMD_PORT"
for v in DB_PORT DBD_PORT CTLD_PORT; do
    for w in DB_PORT DBD_PORT CTLD_PORT; do
        [[ "$v" == "$w" || "${!v}" != "${!w}" ]] || die "INVPROP_SLURM_$v and INVPROP_SLURM_$w are both ${!v}; give them different ports"
    done
    ((${!v} < SLURMD_PORT || ${!v} >= SLURMD_PORT + NODES)) ||
        die "INVPROP_SLURM_$v=${!v} falls in the slurmd ports $SLURMD_PORT-$((SLURMD_PORT + NODES - 1)) (INVPROP_SLURM_SLURMD_PORT + node index); give it another port"
done

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }
if ((NODES == 1)); then NODELIST=node1; else NODELIST="node[1-$NODES]"; fi

# ---------------------------------------------------------------------------------------------------------------
# processes: a component is "running" when its PID file names a live process whose executable and arguments match
# ---------------------------------------------------------------------------------------------------------------
pidfile_of() {
    case "$1" in
        munged) echo "$MUNGE_DIR/munged.pid" ;;
        mariadb) echo "$RUN/mariadb.pid" ;;
        slurmdbd) echo "$RUN/slurmdbd.pid" ;;
        slurmctld) echo "$RUN/slurmctld.pid" ;;
        slurmd:*) echo "$RUN/slurmd-${1#slurmd:}.pid" ;;
    esac
}

# pid_of COMPONENT -> prints the PID (and returns 0) only if that exact process is alive
pid_of() {
    local comp="$1" pf pid exe args want
    pf="$(pidfile_of "$comp")"
    [[ -s "$pf" ]] || return 1
    pid="$(tr -dc '0-9' <"$pf")"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    case "$comp" in
        mariadb) want=mariadbd ;;
        slurmd:*) want=slurmd ;;
        *) want="$comp" ;;
    esac
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    exe="${exe% (deleted)}"
    exe="$(basename "$exe")"
    [[ "$exe" == "$want" || "$exe" == "$want-wlm" ]] || return 1 # Debian: /usr/sbin/slurmctld -> slurmctld-wlm
    args="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
    case "$comp" in
        # started with the config files of *this* state folder, and for the right node
        munged) [[ "$args" == *"$MUNGE_SOCKET"* ]] || return 1 ;;
        mariadb) [[ "$args" == *"$MY_CNF"* ]] || return 1 ;;
        slurmdbd) [[ "$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null)" == *"SLURM_CONF=$SLURM_CONF_FILE"* ]] || return 1 ;;
        slurmctld) [[ "$args" == *"$SLURM_CONF_FILE"* ]] || return 1 ;;
        slurmd:*) [[ "$args" == *"$SLURM_CONF_FILE"* && "$args" == *"-N ${comp#slurmd:} "* ]] || return 1 ;;
    esac
    echo "$pid"
}

is_running() { pid_of "$1" >/dev/null; }

components() {
    echo munged
    echo mariadb
    echo slurmdbd
    echo slurmctld
    node_names | sed 's/^/slurmd:/'
}

any_running() {
    local c
    for c in $(components); do is_running "$c" && return 0; done
    # slurmd of nodes from an earlier, larger configuration
    local pf
    for pf in "$RUN"/slurmd-*.pid; do
        [[ -e "$pf" ]] || continue
        is_running "slurmd:$(basename "$pf" .pid | sed 's/^slurmd-//')" && return 0
    done
    return 1
}

# ---------------------------------------------------------------------------------------------------------------
# what else runs here: listening ports, the clusters of other checkouts, a machine's own slurmctld
# ---------------------------------------------------------------------------------------------------------------
# listening_ports: every TCP port a socket listens on (any address, IPv4 or IPv6), one per line
listening_ports() {
    local hex
    awk 'FNR > 1 && $4 == "0A" { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        while read -r hex; do echo $((16#$hex)); done | sort -un
}

# port_pid PORT: the PID of a process listening on PORT (empty when it cannot be seen)
port_pid() {
    local hex inode fd
    printf -v hex '%04X' "$1"
    for inode in $(awk -v h="$hex" 'FNR > 1 && $4 == "0A" { split($2, a, ":"); if (a[2] == h) print $10 }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null); do
        fd="$(find /proc/[0-9]*/fd -maxdepth 1 -lname "socket:\[$inode\]" -print -quit 2>/dev/null)"
        [[ -n "$fd" ]] && { fd="${fd#/proc/}"; echo "${fd%%/*}"; return 0; }
    done
    return 0
}

# exe_name PID: the program's name (Debian's slurmctld-wlm etc. without the suffix)
exe_name() {
    local exe
    exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
    exe="$(basename "${exe% (deleted)}")"
    echo "${exe%-wlm}"
}

# pids_named NAME: live processes running the program NAME (slurmctld also matches slurmctld-wlm), without the
# helpers such a process forks from itself (slurmctld's slurmscriptd)
pids_named() {
    local pid ppid
    for pid in $(find /proc/[0-9]* -maxdepth 1 -name exe \( -lname "*/$1" -o -lname "*/$1-wlm" \) -printf '%h\n' \
        2>/dev/null | sed 's|^/proc/||' | sort -n); do
        ppid="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $2}')" || continue
        [[ -n "$ppid" && "$(exe_name "$ppid" 2>/dev/null || true)" != "$1" ]] || continue
        echo "$pid"
    done
}

# cluster_state_of PID: the state folder of the local cluster (of any checkout) that PID belongs to: read from the
# config path in its arguments (or environment), and confirmed by the PID file in that folder
cluster_state_of() {
    local pid="$1" name args conf="" pf
    name="$(exe_name "$pid")" || return 1
    args="$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    case "$name" in
        slurmctld | slurmd) conf="$(awk 'prev == "-f" { print; exit } { prev = $0 }' <<<"$args")" ;;
        slurmdbd) conf="$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n 's/^SLURM_CONF=//p')" ;;
        mariadbd) conf="$(sed -n 's/^--defaults-file=//p' <<<"$args" | sed 's|/my.cnf$|/slurm.conf|')" ;;
        munged) conf="$(sed -n 's/^--socket=//p' <<<"$args" | sed 's|/munge/munge.socket.2$|/etc/slurm.conf|')" ;;
        *) return 1 ;;
    esac
    [[ "$conf" == */etc/slurm.conf ]] || return 1
    local state="${conf%/etc/slurm.conf}"
    case "$name" in
        munged) pf="$state/munge/munged.pid" ;;
        mariadbd) pf="$state/run/mariadb.pid" ;;
        slurmd) pf="$(grep -lx "$pid" "$state"/run/slurmd-*.pid 2>/dev/null | head -n 1)" ;;
        *) pf="$state/run/$name.pid" ;;
    esac
    [[ -n "$pf" && -s "$pf" && "$(tr -dc '0-9' <"$pf")" == "$pid" ]] || return 1
    echo "$state"
}

# stop_hint STATE: the command that stops the local cluster kept in STATE
stop_hint() {
    local state="$1" script
    script="$(cat "$state/run/script" 2>/dev/null || true)"
    [[ -n "$script" ]] || script="$(dirname "$state")/local-cluster.sh"
    if [[ "$(dirname "$state")" == "$(dirname "$script")" && "$(basename "$state")" == state ]]; then
        echo "$script down"
    else
        echo "INVPROP_SLURM_STATE=$state $script down"
    fi
}

# port_plan: "PORT COMPONENT VARIABLE" for every port this cluster listens on
port_plan() {
    echo "$DB_PORT mariadb INVPROP_SLURM_DB_PORT"
    echo "$DBD_PORT slurmdbd INVPROP_SLURM_DBD_PORT"
    echo "$CTLD_PORT slurmctld INVPROP_SLURM_CTLD_PORT"
    local i
    for ((i = 1; i <= NODES; i++)); do
        if ((i == 1)); then
            echo "$SLURMD_PORT slurmd:node1 INVPROP_SLURM_SLURMD_PORT"
        else
            echo "$((SLURMD_PORT + i - 1)) slurmd:node$i INVPROP_SLURM_SLURMD_PORT+$((i - 1))"
        fi
    done
}

# free_ports_hint TAKEN: settings that move every port of this cluster by the same offset onto free ports
free_ports_hint() {
    local taken="$1" off port ok
    for ((off = 10; off <= 5000; off += 10)); do
        ok=1
        while read -r port _; do
            port=$((port + off))
            if ((port > 65535)) || [[ "$taken" == *" $port "* ]]; then ok=0 && break; fi
        done < <(port_plan)
        if ((ok)); then
            echo "INVPROP_SLURM_DB_PORT=$((DB_PORT + off)) INVPROP_SLURM_DBD_PORT=$((DBD_PORT + off))" \
                "INVPROP_SLURM_CTLD_PORT=$((CTLD_PORT + off)) INVPROP_SLURM_SLURMD_PORT=$((SLURMD_PORT + off))"
            return 0
        fi
    done
    echo "INVPROP_SLURM_DB_PORT, _DBD_PORT, _CTLD_PORT and _SLURMD_PORT set to free ports"
}

# check_ports: every port a component still to be started needs must be free; else one line naming the holder
check_ports() {
    local taken port comp var first="" more=0
    taken=" $(listening_ports | tr '\n' ' ') "
    while read -r port comp var; do
        is_running "$comp" && continue # ours, already up: it holds its own port
        [[ "$taken" == *" $port "* ]] || continue
        if [[ -z "$first" ]]; then first="$port $comp $var"; else more=$((more + 1)); fi
    done < <(port_plan)
    [[ -n "$first" ]] || return 0
    read -r port comp var <<<"$first"
    local pid who state fix
    pid="$(port_pid "$port")"
    fix="give this cluster free ports: $(free_ports_hint "$taken") $0 up"
    if [[ -z "$pid" ]]; then
        who="a process this shell cannot see"
    elif state="$(cluster_state_of "$pid")"; then
        who="$(exe_name "$pid") (pid $pid) of the local cluster of another checkout (state $state)"
        fix="stop that cluster ($(stop_hint "$state")) or $fix"
    else
        who="$(exe_name "$pid" || echo '?') (pid $pid)"
    fi
    ((more == 0)) || who="$who, and $more more of this cluster's ports are taken"
    die "port $port (${comp/:/ }, $var) is already in use by $who; $fix"
}

# other_clusters: "STATE PID" of the slurmctld of every local cluster of another checkout that is up
other_clusters() {
    local pid state
    for pid in $(pids_named slurmctld); do
        state="$(cluster_state_of "$pid")" || continue
        [[ "$state" == "$STATE" ]] || echo "$state $pid"
    done
}

conf_is_ours() { [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$SLURM_CONF_FILE" ]]; }

# check_install_etc: INVPROP_SLURM_INSTALL_ETC=1 may only write /etc/slurm/slurm.conf when nobody else uses it
check_install_etc() {
    ((INSTALL_ETC)) || return 0
    local what pid ours state
    local instead="run without INVPROP_SLURM_INSTALL_ETC and point commands at this cluster with: eval \"\$($0 env)\""
    if [[ -e "$SYSTEM_CONF" || -L "$SYSTEM_CONF" ]] && ! conf_is_ours; then
        if [[ -L "$SYSTEM_CONF" ]]; then what="a symlink to $(readlink "$SYSTEM_CONF")"; else what="a file"; fi
        die "INVPROP_SLURM_INSTALL_ETC=1 refused: $SYSTEM_CONF exists and is not this checkout's ($what), so it is left alone; $instead"
    fi
    ours="$(pid_of slurmctld || true)"
    for pid in $(pids_named slurmctld); do
        [[ "$pid" != "$ours" ]] || continue
        if state="$(cluster_state_of "$pid")"; then what=" of the local cluster in $state"; else what=""; fi
        die "INVPROP_SLURM_INSTALL_ETC=1 refused: a slurmctld not started by this checkout is running (pid $pid$what), so /etc/slurm is left alone; $instead"
    done
}

# notes for `up`: what else is here that this cluster leaves alone
note_neighbours() {
    local state pid port
    while read -r state pid; do
        [[ -n "$state" ]] || continue
        port="$(sed -n 's/^SlurmctldPort=//p' "$state/etc/slurm.conf" 2>/dev/null || true)"
        log "note: the local cluster of another checkout is up too (state $state, slurmctld port ${port:-?}); they share no port"
    done < <(other_clusters)
    if ! ((INSTALL_ETC)) && [[ -e "$SYSTEM_CONF" || -L "$SYSTEM_CONF" ]] && ! conf_is_ours; then
        log "note: this machine has its own SLURM configuration ($SYSTEM_CONF); it is left alone (this cluster is reached through SLURM_CONF)"
    fi
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND... : poll every 0.2 s
    local secs="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    while ! "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# wait_ready SECONDS COMPONENT COMMAND...: like wait_for, but fail at once (with the logs) if COMPONENT dies
wait_ready() {
    local secs="$1" comp="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    while ! "$@" >/dev/null 2>&1; do
        is_running "$comp" || fail_up "$comp exited during start-up"
        ((SECONDS < deadline)) || fail_up "$comp is not ready after ${secs}s"
        sleep 0.2
    done
}

tail_logs() {
    local f
    for f in "$LOG"/*.log "$MUNGE_DIR/munged.log"; do
        [[ -s "$f" ]] || continue
        printf '\n----- last lines of %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

fail_up() {
    printf '[local-cluster] ERROR: %s\n' "$*" >&2
    tail_logs
    printf '\n[local-cluster] state folder: %s\n' "$STATE" >&2
    exit 1 # the EXIT trap of cmd_up stops what this `up` started
}

# Components this `up` started (in order), and the MariaDB server before it has written its PID file.
STARTED=()
MARIADB_BOOT_PID=""
UP_DONE=0

# rollback: a failed `up` stops exactly what it started, so the machine is left as it was found
rollback() {
    ((UP_DONE == 0 && ${#STARTED[@]} > 0)) || return 0
    log "stopping what this failed up started: ${STARTED[*]}"
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_components "${STARTED[i]}"; done
    if [[ -n "$MARIADB_BOOT_PID" && -d /proc/$MARIADB_BOOT_PID && "$(exe_name "$MARIADB_BOOT_PID")" == mariadbd ]]; then
        kill -TERM "$MARIADB_BOOT_PID" 2>/dev/null || true
        wait_for 20 mariadb-exit dead "$MARIADB_BOOT_PID" || kill -KILL "$MARIADB_BOOT_PID" 2>/dev/null || true
    fi
    [[ " ${STARTED[*]} " != *" munged "* ]] || rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    [[ " ${STARTED[*]} " != *" mariadb "* ]] || rm -f "$RUN/mysqld.sock"
}
dead() { [[ ! -d /proc/$1 || "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" == Z ]]; }

# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
render() { # render TEMPLATE OUTPUT MODE: replace every @KEY@ by the value of the shell variable KEY
    local tpl="$1" out="$2" mode="$3" text key
    text="$(<"$tpl")"
    for key in STATE CLUSTER HOST CTLD_PORT DBD_PORT DB_PORT DB_PASS MUNGE_SOCKET NODELIST SLURMD_PORTS CPUS MEM_MB \
        GRES_NODE GRES_TYPES_LINE ACCT_TRES_LINE GPU_MAX MIN_JOB_AGE; do
        text="${text//@$key@/${!key:-}}"
    done
    [[ "$text" != *@[A-Z_]*@* ]] || die "unreplaced placeholder in $tpl"
    (umask 077 && printf '%s\n' "$text" >"$out.tmp")
    chmod "$mode" "$out.tmp"
}

generate_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/spool/slurmctld"
    # which script runs this state folder: named in the hints other checkouts print
    printf '%s\n' "$SCRIPT_DIR/local-cluster.sh" >"$RUN/script.tmp" && mv -f "$RUN/script.tmp" "$RUN/script"
    local n
    for n in $(node_names); do mkdir -p "$STATE/spool/slurmd-$n"; done
    if [[ ! -s "$STATE/db.password" ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE/db.password")
    fi
    DB_PASS="$(<"$STATE/db.password")"
    if ((NODES == 1)); then SLURMD_PORTS="$SLURMD_PORT"; else SLURMD_PORTS="$SLURMD_PORT-$((SLURMD_PORT + NODES - 1))"; fi
    GRES_NODE="" GRES_TYPES_LINE="" ACCT_TRES_LINE="" GPU_MAX=0
    if ((GPUS > 0)); then
        GRES_NODE="Gres=gpu:$GPUS"
        GRES_TYPES_LINE="GresTypes=gpu"
        ACCT_TRES_LINE="AccountingStorageTRES=gres/gpu"
        GPU_MAX=$((GPUS - 1))
        mkdir -p "$STATE/dev"
        local i
        for ((i = 0; i < GPUS; i++)); do
            [[ -c "$STATE/dev/gpu$i" ]] || mknod "$STATE/dev/gpu$i" c 1 3
        done
    fi
    render "$TEMPLATES/slurm.conf.in" "$SLURM_CONF_FILE" 644
    render "$TEMPLATES/slurmdbd.conf.in" "$DBD_CONF_FILE" 600
    render "$TEMPLATES/my.cnf.in" "$MY_CNF" 644
    if ((GPUS > 0)); then
        render "$TEMPLATES/gres.conf.in" "$ETC/gres.conf" 644
        [[ $GPUS -gt 1 ]] || sed -i "s|gpu\[0-0\]|gpu0|" "$ETC/gres.conf.tmp"
    elif ! any_running; then
        rm -f "$ETC/gres.conf"
    fi
    local f changed=0
    for f in "$SLURM_CONF_FILE" "$DBD_CONF_FILE" "$MY_CNF" "$ETC/gres.conf"; do
        [[ -e "$f.tmp" ]] || continue
        if [[ -e "$f" ]] && cmp -s "$f" "$f.tmp"; then
            rm -f "$f.tmp"
        elif [[ -e "$f" ]] && any_running; then
            changed=1
            rm -f "$f.tmp"
        else
            mv -f "$f.tmp" "$f"
        fi
    done
    if ((changed)); then
        log "WARNING: the settings differ from those the running cluster was started with; keeping the running"
        log "         configuration. Apply the new settings with: $0 down && $0 up"
    fi
    {
        echo "# source this file to talk to the local cluster (written by slurm/local-cluster.sh)"
        echo "export SLURM_CONF=$SLURM_CONF_FILE"
    } >"$STATE/env.sh"
}

# Only with INVPROP_SLURM_INSTALL_ETC=1, after check_install_etc, and only once the cluster is up.
install_system_conf() {
    ((INSTALL_ETC)) || return 0
    conf_is_ours && return 0
    mkdir -p /etc/slurm
    ln -s "$SLURM_CONF_FILE" "$SYSTEM_CONF"
    log "$SYSTEM_CONF -> $SLURM_CONF_FILE (INVPROP_SLURM_INSTALL_ETC=1; removed by down)"
}

restore_system_conf() {
    conf_is_ours || return 0
    rm -f "$SYSTEM_CONF"
    # state folders of earlier versions of this script may hold the file that was there before
    if [[ -e "$BACKUP_DIR/slurm.conf.orig" || -L "$BACKUP_DIR/slurm.conf.orig" ]]; then
        mv "$BACKUP_DIR/slurm.conf.orig" "$SYSTEM_CONF"
        log "restored the original $SYSTEM_CONF"
    fi
}

# ---------------------------------------------------------------------------------------------------------------
# starting the components
# ---------------------------------------------------------------------------------------------------------------
check_socket_paths() {
    local p
    for p in "$MUNGE_SOCKET" "$RUN/mysqld.sock"; do
        ((${#p} < 100)) || die "socket path too long (${#p} chars, limit ~100): $p; set INVPROP_SLURM_STATE to a shorter folder"
    done
}

start_munged() {
    is_running munged && return 0
    mkdir -p "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key")
    fi
    chmod 400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_DIR/munged.pid" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    STARTED+=(munged)
    # munged forks into the background itself and writes its PID file.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.stdout" 2>&1 9>&- ||
        fail_up "munged did not start"
    wait_for 15 munged munge_ok || fail_up "munged is not answering on $MUNGE_SOCKET"
}
munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }

mysql_root() { mariadb --defaults-file="$MY_CNF" -uroot "$@"; }

start_mariadb() {
    if ! is_running mariadb; then
        if [[ ! -d "$STATE/mysql/mysql" ]]; then
            rm -rf "$STATE/mysql"
            mkdir -p "$STATE/mysql"
            log "initialising the private MariaDB datadir ($STATE/mysql)"
            mariadb-install-db --defaults-file="$MY_CNF" --user=root --skip-test-db \
                --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
                fail_up "mariadb-install-db failed (see $LOG/mariadb-install.log)"
        fi
        rm -f "$RUN/mariadb.pid" "$RUN/mysqld.sock"
        # mariadbd stays in the foreground: detach it into its own session; it writes its own PID file.
        STARTED+=(mariadb)
        setsid mariadbd --defaults-file="$MY_CNF" </dev/null >>"$LOG/mariadb.stdout" 2>&1 9>&- &
        local pid=$!
        MARIADB_BOOT_PID=$pid
        local deadline=$((SECONDS + 60))
        until mysql_root -e 'SELECT 1' >/dev/null 2>&1; do
            [[ -d /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] ||
                fail_up "MariaDB exited during start-up (see $LOG/mariadb.log)"
            ((SECONDS < deadline)) || fail_up "MariaDB did not come up within 60s"
            sleep 0.2
        done
        wait_for 10 mariadb-pid is_running mariadb || fail_up "MariaDB wrote no PID file"
    fi
    # the database and the user slurmdbd connects as (idempotent)
    mysql_root <<SQL || fail_up "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    if ! is_running slurmdbd; then
        rm -f "$RUN/slurmdbd.pid"
        STARTED+=(slurmdbd)
        # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF and daemonizes itself.
        SLURM_CONF="$SLURM_CONF_FILE" slurmdbd </dev/null >>"$LOG/slurmdbd.stdout" 2>&1 9>&- || fail_up "slurmdbd did not start"
        wait_for 10 slurmdbd-pid is_running slurmdbd || fail_up "slurmdbd exited"
    fi
    wait_ready 60 slurmdbd dbd_ok
}

ctld_ok() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
    if ! is_running slurmctld; then
        rm -f "$RUN/slurmctld.pid"
        STARTED+=(slurmctld)
        slurmctld -f "$SLURM_CONF_FILE" </dev/null >>"$LOG/slurmctld.stdout" 2>&1 9>&- || fail_up "slurmctld did not start"
        wait_for 10 slurmctld-pid is_running slurmctld || fail_up "slurmctld exited"
    fi
    wait_ready 60 slurmctld ctld_ok
}

start_slurmds() {
    local n
    for n in $(node_names); do
        is_running "slurmd:$n" && continue
        rm -f "$RUN/slurmd-$n.pid"
        STARTED+=("slurmd:$n")
        slurmd -f "$SLURM_CONF_FILE" -N "$n" </dev/null >>"$LOG/slurmd-$n.stdout" 2>&1 9>&- || fail_up "slurmd -N $n did not start"
    done
    for n in $(node_names); do
        wait_for 10 "slurmd $n" is_running "slurmd:$n" || fail_up "slurmd for $n exited"
    done
}

# every node answers and can run jobs (idle, or busy with jobs when the cluster is already in use)
nodes_ready() {
    local out line state
    out="$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null)" || return 1
    [[ -n "$out" ]] || return 1
    [[ "$(wc -l <<<"$out")" -ge "$NODES" ]] || return 1
    while read -r _ state; do
        case "$state" in
            idle | mixed | allocated | completing) ;;
            *) return 1 ;;
        esac
    done <<<"$out"
}

resume_bad_nodes() {
    local node state
    while read -r node state; do
        case "$state" in
            down* | drain* | fail*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
        esac
    done < <(sinfo -h -N -o '%N %T' 2>/dev/null || true)
}

ensure_root_association() {
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        # slurmctld normally registers the cluster itself; do it by hand if it has not happened yet
        sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    fi
    wait_for 30 "cluster registration" cluster_registered || fail_up "cluster $CLUSTER is not registered in slurmdbd"
    if ! sacctmgr -n -P list assoc cluster="$CLUSTER" user=root format=user | grep -qx root; then
        sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null ||
            fail_up "could not add the root user association"
    fi
}
cluster_registered() { sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; }

cmd_up() {
    [[ $EUID -eq 0 ]] || die "run as root (the daemons run as root)"
    local t0=$SECONDS c
    local missing
    for c in munged mariadb mariadb-install-db mariadbd slurmdbd slurmctld slurmd sbatch sacctmgr; do
        command -v "$c" >/dev/null 2>&1 || missing+=" $c"
    done
    [[ -z "${missing:-}" ]] ||
        die "missing programs:$missing; install: apt-get install --no-install-recommends munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
    # Everything that could collide is checked before anything is changed.
    check_socket_paths
    check_install_etc
    check_ports
    note_neighbours
    trap rollback EXIT
    trap 'exit 130' INT TERM
    generate_configs
    local all=1
    for c in $(components); do is_running "$c" || all=0; done
    if ((all)) && ctld_ok && nodes_ready; then
        UP_DONE=1
        install_system_conf
        log "already running (state: $STATE)"
        print_env_hint
        return 0
    fi
    start_munged
    log "munged ok (+$((SECONDS - t0))s)"
    start_mariadb
    log "mariadb ok (+$((SECONDS - t0))s)"
    start_slurmdbd
    log "slurmdbd ok (+$((SECONDS - t0))s)"
    start_slurmctld
    log "slurmctld ok (+$((SECONDS - t0))s)"
    start_slurmds
    log "slurmd x$NODES started (+$((SECONDS - t0))s); waiting for the nodes"
    local deadline=$((SECONDS + UP_TIMEOUT)) resumed=0
    until nodes_ready; do
        if ((SECONDS > t0 + 20 && !resumed)); then
            resume_bad_nodes
            resumed=1
        fi
        if ((SECONDS >= deadline)); then
            sinfo -N -l >&2 || true
            fail_up "nodes did not become idle within ${UP_TIMEOUT}s"
        fi
        sleep 0.3
    done
    ensure_root_association
    UP_DONE=1
    install_system_conf
    log "up in $((SECONDS - t0))s: $NODES node(s) $NODELIST, $CPUS CPUs each$( ((GPUS)) && echo ", $GPUS fake GPU(s) each"), state in $STATE"
    print_env_hint
}

print_env_hint() {
    if ((INSTALL_ETC)); then
        log "$SYSTEM_CONF -> $SLURM_CONF_FILE; other shells need nothing"
    else
        log "point Slurm commands (sbatch, squeue, sacct, the launcher) at this cluster with: eval \"\$($0 env)\""
    fi
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
}

# test-env: `up` for `make test`; stdout is eval'ed by make
cmd_test_env() {
    local out="$LOG/up.out" rc=0 reason
    mkdir -p "$LOG"
    (
        take_lock
        cmd_up
    ) >"$out" 2>&1 || rc=$?
    grep '^\[local-cluster\] note:' "$out" >&2 || true
    if ((rc == 0)); then
        grep -E '^\[local-cluster\] (up in|already running)' "$out" >&2 || true
        echo "export SLURM_CONF=$SLURM_CONF_FILE"
        return 0
    fi
    reason="$(sed -n 's/^\[local-cluster\] ERROR: //p' "$out" | head -n 1)"
    [[ -n "$reason" ]] || reason="'$0 up' failed with exit code $rc"
    if [[ "${INVPROP_SLURM_REQUIRED:-0}" != 0 ]]; then
        cat "$out" >&2
        die "INVPROP_SLURM_REQUIRED=1: the cluster tests must run, but the local SLURM cluster did not start: $reason"
    fi
    log "the local SLURM cluster did not start, so its tests will be skipped: $reason (full output: $out)"
    printf 'export INVPROP_SLURM_UNAVAILABLE=%q\n' "$reason"
}

# ---------------------------------------------------------------------------------------------------------------
# stopping
# ---------------------------------------------------------------------------------------------------------------
stop_components() { # stop_components COMPONENT...: SIGTERM all, wait, SIGKILL what is left after 20 s
    local c pid pids=()
    for c in "$@"; do
        pid="$(pid_of "$c")" || continue
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    if ((${#pids[@]} == 0)); then
        for c in "$@"; do rm -f "$(pidfile_of "$c")"; done # stale: they name no process of ours
        return 0
    fi
    local deadline=$((SECONDS + 20)) alive
    while :; do
        alive=()
        for pid in "${pids[@]}"; do
            if [[ -d /proc/$pid ]] && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then alive+=("$pid"); fi
        done
        ((${#alive[@]})) || break
        if ((SECONDS >= deadline)); then
            log "killing processes that ignored SIGTERM: ${alive[*]}"
            kill -KILL "${alive[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    for c in "$@"; do rm -f "$(pidfile_of "$c")"; done
}

cmd_down() {
    local t0=$SECONDS pf n slurmds=()
    for pf in "$RUN"/slurmd-*.pid; do
        [[ -e "$pf" ]] || continue
        n="$(basename "$pf" .pid)"
        slurmds+=("slurmd:${n#slurmd-}")
    done
    if is_running slurmctld && ctld_ok >/dev/null 2>&1; then
        local jobs
        jobs="$(squeue -h -o %i 2>/dev/null | sort -u | tr '\n' ' ')"
        if [[ -n "${jobs// /}" ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for 20 "jobs to end" no_running_jobs || log "some jobs are still ending"
        fi
    fi
    stop_components "${slurmds[@]}" slurmctld
    stop_components slurmdbd
    stop_components mariadb
    stop_components munged
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$RUN/mysqld.sock"
    restore_system_conf
    log "down in $((SECONDS - t0))s (state kept in $STATE; it may be removed now)"
}
no_running_jobs() { [[ -z "$(squeue -h -t running,completing,configuring -o %i 2>/dev/null)" ]]; }

# ---------------------------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------------------------
cmd_status() {
    local c pid up=0 total=0
    echo "state folder: $STATE"
    echo "SLURM_CONF:   $SLURM_CONF_FILE"
    if [[ -L "$SYSTEM_CONF" ]]; then echo "$SYSTEM_CONF -> $(readlink "$SYSTEM_CONF")"; fi
    for c in $(components); do
        total=$((total + 1))
        if pid="$(pid_of "$c")"; then
            printf '  %-14s running (pid %s)\n' "$c" "$pid"
            up=$((up + 1))
        else
            printf '  %-14s stopped\n' "$c"
        fi
    done
    if ((up == 0)); then
        echo "cluster: DOWN"
        return 1
    fi
    if is_running slurmctld && ctld_ok >/dev/null 2>&1; then
        sinfo -N -o '%10N %10P %12T %5c %8m %10G %E' || true
        if ((up == total)) && nodes_ready; then
            echo "cluster: UP"
            return 0
        fi
    fi
    echo "cluster: DEGRADED ($up/$total daemons running); run: $0 up"
    return 2
}

# `up` and `down` hold a lock so that two of them never run at once (fd 9 is closed for the daemons).
take_lock() {
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another up/down still holds $STATE/.lock"
}

case "${1:-}" in
    up)
        take_lock
        cmd_up
        ;;
    down)
        take_lock
        cmd_down
        ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF_FILE" ;;
    test-env) cmd_test_env ;;
    *)
        echo "usage: $0 up|down|status|env|test-env" >&2
        exit 64
        ;;
esac
