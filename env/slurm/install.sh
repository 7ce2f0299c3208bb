#!/usr/bin/env bash
# Install a single-node Slurm (Debian packages) + munge. Idempotent.
# Does NOT install slurmdbd/mariadb: the test cluster runs without accounting.
set -euo pipefail

PKGS=(slurm-wlm slurmctld slurmd slurm-client munge)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install.sh: Slurm and munge already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: need root to install: ${missing[*]}" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
echo "install.sh: installing ${missing[*]}"
apt-get update
apt-get install -y --no-install-recommends "${PKGS[@]}"

# The postinst normally creates the key; make sure one exists.
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
echo "install.sh: done"
