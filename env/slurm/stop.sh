#!/usr/bin/env bash
# Stop the Slurm test cluster started by env/slurm/start.sh <state_dir>. Idempotent.
#
#   env/slurm/stop.sh <state_dir>
#
# Cancels remaining jobs, then stops slurmd, slurmctld and munged by the PIDs in their
# pidfiles in <state_dir> (munged only if start.sh started it), and removes the
# /etc/slurm symlinks if they point into <state_dir>.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 <state_dir>" >&2; exit 2; }
if [ ! -d "$1" ]; then
    echo "stop.sh: $1 does not exist; nothing to stop"
    exit 0
fi
STATE_DIR="$(cd "$1" && pwd -P)"

pid_of() { [ -s "$1" ] && tr -dc '0-9' < "$1"; }

ctld_pid="$(pid_of "$STATE_DIR/slurmctld.pid" || true)"
if [ -n "$ctld_pid" ] && kill -0 "$ctld_pid" 2>/dev/null \
   && [ "$(readlink -f /etc/slurm/slurm.conf 2>/dev/null)" = "$STATE_DIR/slurm.conf" ]; then
    # Cancel whatever is still queued/running so no job processes outlive the cluster.
    jobs="$(squeue -h -t PD,R,CG,S,CF,RQ,RS -o %i 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

# Check that the pid in <pidfile> is alive and really <name>; print it.
daemon_pid() {  # name pidfile
    local name="$1" pidfile="$2" pid comm
    pid="$(pid_of "$pidfile" || true)"
    [ -n "$pid" ] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    [ -n "$comm" ] || return 1
    if [ "$comm" != "$name" ]; then
        echo "stop.sh: pid $pid from $pidfile is '$comm', not $name; leaving it alone" >&2
        return 1
    fi
    echo "$pid"
}

stop_daemons() {  # name... : SIGTERM them together, wait up to 10 s, then SIGKILL
    local name pid pids=() names=()
    for name in "$@"; do
        if pid="$(daemon_pid "$name" "$STATE_DIR/$name.pid")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$name")
        fi
        rm -f "$STATE_DIR/$name.pid"
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "stop.sh: ${names[$i]} (${pids[$i]}) did not exit after 10 s; sending SIGKILL" >&2
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
        echo "stop.sh: stopped ${names[$i]} (${pids[$i]})"
    done
}

# All together: each takes ~1-2 s to exit, and none needs munge to shut down.
stop_daemons slurmd slurmctld munged

for f in slurm.conf gres.conf; do
    if [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$STATE_DIR/$f" ]; then
        rm -f "/etc/slurm/$f"
    fi
done
exit 0
