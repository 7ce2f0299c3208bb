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

stop_daemon() {  # name pidfile
    local name="$1" pidfile="$2" pid comm
    pid="$(pid_of "$pidfile" || true)"
    if [ -z "$pid" ]; then
        rm -f "$pidfile"; return 0
    fi
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    if [ -z "$comm" ]; then
        rm -f "$pidfile"; return 0
    fi
    if [ "$comm" != "$name" ]; then
        echo "stop.sh: pid $pid from $pidfile is '$comm', not $name; leaving it alone" >&2
        rm -f "$pidfile"; return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop.sh: $name ($pid) did not exit after 10 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "stop.sh: stopped $name ($pid)"
}

stop_daemon slurmd "$STATE_DIR/slurmd.pid"
stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
stop_daemon munged "$STATE_DIR/munged.pid"

for f in slurm.conf gres.conf; do
    if [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$STATE_DIR/$f" ]; then
        rm -f "/etc/slurm/$f"
    fi
done
exit 0
