#!/usr/bin/env bash
# Stops the daemons that benchmarks/slurm/setup.sh started (listed in its state file), newest first:
# slurmd, slurmctld, munged. Daemons it did not start are left alone. Packages and config stay.
set -euo pipefail

STATE=/run/fastnet-slurm/started
[[ -s $STATE ]] || { echo "teardown.sh: nothing recorded in $STATE; nothing to stop"; exit 0; }
tac "$STATE" | while read -r name pidfile; do
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ $(cat /proc/"$pid"/comm) == "$name" ]]; then
    echo "teardown.sh: stopping $name (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then echo "teardown.sh: $name (pid $pid) still running after 10 s" >&2; exit 1; fi
  else
    echo "teardown.sh: $name not running"
  fi
done
rm -f "$STATE"
echo "teardown.sh: done"
