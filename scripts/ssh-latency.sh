#!/usr/bin/env bash
# Time one SSH command on lab-1 as root and as the lab user cwlab, over a
# shared connection, so only the remote shell's own start-up differs.
# Needs `manage.py lab up`. Usage: scripts/ssh-latency.sh [runs]
set -euo pipefail
runs=${1:-10}
root=${CRIUWEB_LAB_ROOT:-/var/lib/criuweb-lab}
known=$(mktemp)
trap 'rm -f "$known"' EXIT
echo "10.213.0.11 $(awk '{print $1" "$2}' "$root/lab-1/ssh_host_ed25519_key.pub")" > "$known"
for user in root cwlab; do
    opts=(-i "$root/keys/id_ed25519" -o UserKnownHostsFile="$known" -o ControlMaster=auto
          -o ControlPath="/tmp/criuweb-latency-$user" -o ControlPersist=30)
    ssh "${opts[@]}" "$user@10.213.0.11" true
    start=$(date +%s%N)
    for _ in $(seq "$runs"); do ssh "${opts[@]}" "$user@10.213.0.11" true; done
    end=$(date +%s%N)
    echo "$user: $(( (end - start) / runs / 1000000 )) ms per command"
    ssh "${opts[@]}" -O exit "$user@10.213.0.11" 2>/dev/null || true
done
