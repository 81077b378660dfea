#!/usr/bin/env bash
# Starts a one-node SLURM cluster on this machine for tests/slurm.rs: installs munge and
# slurm-wlm if they are missing, writes /etc/slurm/slurm.conf from .ci/slurm/slurm.conf and the
# node's own description, starts munged, slurmctld and slurmd by hand (containers have no
# systemd), and waits until the node is idle. Idempotent: a controller that already answers is
# left alone. Needs root (or sudo).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

sudo_if() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

conf=/etc/slurm/slurm.conf
ours() { [ -e "$conf" ] && grep -q '^ClusterName=probex-ci$' "$conf"; }
# Our own cluster with no controller running needs no probe (sinfo would wait seconds for it).
if ! { ours && ! pgrep -x slurmctld >/dev/null; } && command -v sinfo >/dev/null \
    && timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm: a controller already answers; nothing to start"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm: installing munge and slurm-wlm"
    sudo_if apt-get update -qq
    sudo_if env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        munge slurm-wlm >/dev/null
fi

if [ -e "$conf" ] && ! ours; then
    echo "slurm: $conf exists and is not probex's test cluster; refusing to replace it" >&2
    exit 1
fi
host="$(hostname -s)"
node="$(slurmd -C | head -n 1)"   # NodeName=<host> CPUs=... RealMemory=...
tmp="$(mktemp)"
sed "s/@HOST@/$host/" "$here/slurm.conf" > "$tmp"
printf '%s NodeAddr=127.0.0.1 State=UNKNOWN\n' "$node" >> "$tmp"
printf 'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO\n' >> "$tmp"
sudo_if mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
sudo_if install -m 0644 "$tmp" "$conf"
rm -f "$tmp"

# munge: a key readable only by its user, and the daemon running as that user.
if [ ! -s /etc/munge/munge.key ]; then
    sudo_if sh -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null'
fi
sudo_if chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
sudo_if chmod 0400 /etc/munge/munge.key
sudo_if chmod 0755 /run/munge
if ! pgrep -x munged >/dev/null; then
    sudo_if runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { echo "slurm: munge does not work" >&2; exit 1; }

pgrep -x slurmctld >/dev/null || sudo_if /usr/sbin/slurmctld -i
pgrep -x slurmd >/dev/null || sudo_if /usr/sbin/slurmd

# Wait for the node to register and become idle (a node left DOWN by an earlier run is resumed).
for i in $(seq 120); do
    state="$(sinfo -h -n "$host" -o '%T' 2>/dev/null || true)"
    case "$state" in
        idle|mixed|allocated) echo "slurm: node $host is $state"; exit 0 ;;
        down*|drain*) sudo_if scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
echo "slurm: the node did not become idle (state: ${state:-none}); see /var/log/slurm/" >&2
exit 1
