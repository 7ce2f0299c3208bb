#!/usr/bin/env bash
# Start a single-node Slurm test cluster (munged + slurmctld + slurmd, no systemd).
#
#   env/slurm/start.sh <state_dir>
#
# Writes <state_dir>/slurm.conf and gres.conf from env/slurm/*.conf.in, symlinks them
# into /etc/slurm/, starts the daemons with pidfiles/logs in <state_dir> and waits until
# the node is idle.  Stop with env/slurm/stop.sh <state_dir>.  Needs root and
# env/slurm/install.sh.  Tunables (environment):
#   SLURM_TEST_CPUS     CPUs the node advertises (default 8, may exceed the real count)
#   SLURM_TEST_MEM_MB   node RealMemory (default: max(90% of MemTotal, CPUS*2048))
#   SLURM_TEST_GPUS     fake GPUs on the node (default 2)
#   SLURM_TEST_MAX_TIME partition MaxTime in minutes (default 120)
#   SLURM_TEST_TIMEOUT  seconds to wait for the node to become idle (default 60)
set -euo pipefail

die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[ $# -eq 1 ] || { echo "usage: $0 <state_dir>" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "must run as root (daemons run as root, /etc/slurm is written)"
for b in slurmctld slurmd munged sinfo scontrol; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || die "$b not found; run env/slurm/install.sh"
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
STATE_DIR="$(cd "$1" && pwd -P)"
chmod 0755 "$STATE_DIR"

CPUS="${SLURM_TEST_CPUS:-8}"
NGPUS="${SLURM_TEST_GPUS:-2}"
MAX_TIME="${SLURM_TEST_MAX_TIME:-120}"
TIMEOUT="${SLURM_TEST_TIMEOUT:-60}"
CTLD_PORT="${SLURM_TEST_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-6818}"
HOST="$(hostname -s)"
ADDR=127.0.0.1
if [ -n "${SLURM_TEST_MEM_MB:-}" ]; then
    MEM_MB="$SLURM_TEST_MEM_MB"
else
    MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    [ "$MEM_MB" -ge $((CPUS * 2048)) ] || MEM_MB=$((CPUS * 2048))
fi
DEF_MEM_PER_CPU=$((MEM_MB / CPUS))
[ "$DEF_MEM_PER_CPU" -le 1024 ] || DEF_MEM_PER_CPU=1024
[ "$NGPUS" -ge 1 ] || die "SLURM_TEST_GPUS must be >= 1"

pid_alive() {  # pidfile -> 0 if the pid in it is alive
    local p
    [ -s "$1" ] || return 1
    p="$(tr -dc '0-9' < "$1")"
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}

show_logs() {
    {
        echo "----- sinfo -----";        sinfo -N -l 2>&1 || true
        echo "----- sinfo -R -----";     sinfo -R 2>&1 || true
        for f in "$STATE_DIR"/log/slurmctld.log "$STATE_DIR"/log/slurmd.log /var/log/munge/munged.log; do
            echo "----- tail -n 40 $f -----"
            tail -n 40 "$f" 2>&1 || true
        done
    } >&2
}

# --- refuse to clobber another cluster / a real config -----------------------------
for f in slurm.conf gres.conf; do
    t="/etc/slurm/$f"
    if [ -e "$t" ] && [ ! -L "$t" ]; then
        die "$t is a regular file (a real Slurm config?); refusing to replace it"
    fi
done
if [ -L /etc/slurm/slurm.conf ]; then
    other="$(dirname "$(readlink /etc/slurm/slurm.conf)")"
    if [ "$other" != "$STATE_DIR" ] && { pid_alive "$other/slurmctld.pid" || pid_alive "$other/slurmd.pid"; }; then
        die "another test cluster is running from $other; stop it first: $HERE/stop.sh $other"
    fi
fi

# --- render config -----------------------------------------------------------------
mkdir -p "$STATE_DIR"/{slurmctld,slurmd,log,dev}
for i in $(seq 0 $((NGPUS - 1))); do
    ln -sfn /dev/null "$STATE_DIR/dev/nvidia$i"
done
render() {
    sed -e "s|@HOSTNAME@|$HOST|g" -e "s|@ADDR@|$ADDR|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" \
        -e "s|@NGPUS@|$NGPUS|g" -e "s|@LAST_GPU@|$((NGPUS - 1))|g" -e "s|@MAX_TIME@|$MAX_TIME|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" "$1" > "$2"
    if grep -n '@[A-Z_][A-Z_]*@' "$2"; then die "unsubstituted placeholder in $2"; fi
}
render "$HERE/slurm.conf.in" "$STATE_DIR/slurm.conf"
render "$HERE/gres.conf.in" "$STATE_DIR/gres.conf"
mkdir -p /etc/slurm
# The config must be at /etc/slurm/slurm.conf: SLURM_CONF alone is not enough (the
# snakemake slurm jobstep strips SLURM_* before its inner srun).
ln -sfn "$STATE_DIR/slurm.conf" /etc/slurm/slurm.conf
ln -sfn "$STATE_DIR/gres.conf" /etc/slurm/gres.conf

# --- munged --------------------------------------------------------------------------
mkdir -p /run/munge
chown munge:munge /run/munge
chmod 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "start.sh: munged already running; reusing it"
else
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key missing; run env/slurm/install.sh"
    rm -f /run/munge/munged.pid
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged || { show_logs; die "munged failed to start"; }
    else
        su -s /bin/sh munge -c /usr/sbin/munged || { show_logs; die "munged failed to start"; }
    fi
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || { show_logs; die "munged does not answer"; }
    # munged (running as munge) keeps its own pidfile in /run/munge; record it here so
    # that stop.sh stops exactly the munged this script started.
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
fi

# --- slurmctld, slurmd ---------------------------------------------------------------
if pid_alive "$STATE_DIR/slurmctld.pid"; then
    echo "start.sh: slurmctld already running"
else
    /usr/sbin/slurmctld || { show_logs; die "slurmctld failed to start"; }
fi
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    # slurmctld forks, writes its pidfile, and may die right after (bad config): fail fast.
    if [ -s "$STATE_DIR/slurmctld.pid" ] && ! pid_alive "$STATE_DIR/slurmctld.pid"; then break; fi
    sleep 0.1
done
scontrol ping 2>/dev/null | grep -q 'is UP' || { show_logs; die "slurmctld does not answer (scontrol ping)"; }

if pid_alive "$STATE_DIR/slurmd.pid"; then
    echo "start.sh: slurmd already running"
else
    /usr/sbin/slurmd || { show_logs; die "slurmd failed to start"; }
fi

# --- wait for the node ---------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -n1)"
    case "$state" in
        idle|mix|alloc) break ;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mix|alloc) ;;
    *) show_logs; die "node $HOST not idle after ${TIMEOUT}s (state: '${state:-none}'); logs above" ;;
esac
# --- smoke test: a job step really runs (munge credentials, slurmd launch) ---------
if [ "${SLURM_TEST_SMOKE:-1}" = 1 ]; then
    smoke="$(timeout 30 srun -N1 -n1 -t 1 --mem=16 -J start-smoke -D / hostname 2>&1)" \
        || { echo "$smoke" >&2; show_logs; die "smoke job (srun hostname) failed; logs above"; }
fi
# --- wait for the first main-scheduler cycle (~3 s after slurmctld starts): before it,
# sbatch jobs pend; after it they start within ~1 s --------------------------------------
sched_cycles() { sdiag 2>/dev/null | awk '/^Main schedule statistics/ {m=1} m && /Total cycles:/ {print $3; exit}'; }
while [ "$SECONDS" -lt "$deadline" ] && [ "$(sched_cycles)" = 0 ]; do sleep 0.2; done
[ "$(sched_cycles)" != 0 ] || { show_logs; die "main scheduler did not run within ${TIMEOUT}s"; }

echo "start.sh: Slurm test cluster up: node $HOST ($CPUS CPUs, ${MEM_MB} MB, $NGPUS fake GPUs), partitions cpu (default), gpu; state in $STATE_DIR"
