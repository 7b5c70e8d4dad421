#!/usr/bin/env bash
# Single-node Slurm on this machine, for the README's launch recipe (benchmarks/slurm/run_recipe.sh).
# Run as root; idempotent: installs slurmctld/slurmd/slurm-client/munge, makes a munge key if missing,
# writes /etc/slurm/slurm.conf for one node (no cgroups, no accounting), starts munged, slurmctld and
# slurmd (only those not already running; what it starts is listed in $STATE for teardown.sh), and waits
# until sinfo shows the node idle. On failure it prints the step, the reason and the daemon's log lines.
set -euo pipefail

STATE=/run/fastnet-slurm/started         # daemons this script started: "name pidfile" lines
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
HOST=$(hostname -s)
WAIT_S=${WAIT_S:-30}

die() {                                  # die STEP REASON [LOGFILE...]: the reason and the logs' tails
  local step=$1 reason=$2; shift 2
  echo "setup.sh: FAILED at '$step': $reason" >&2
  for log in "$@"; do [[ -f $log ]] && { echo "--- last lines of $log:" >&2; tail -n 25 "$log" >&2; }; done
  exit 1
}
[[ $EUID -eq 0 ]] || die preflight "must run as root (installs packages, starts daemons)"
mkdir -p "$(dirname "$STATE")" "$LOGDIR"; touch "$STATE"
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }   # running PIDFILE

# 1. Packages (Debian bookworm: Slurm 22.05). Service starts by the packages' scripts are blocked
#    (exit 101 from policy-rc.d) so that this script starts, and teardown.sh stops, every daemon.
if ! dpkg -s slurmctld slurmd slurm-client munge >/dev/null 2>&1; then
  echo "setup.sh: installing slurmctld slurmd slurm-client munge"
  had_policy=0; [[ -e /usr/sbin/policy-rc.d ]] && had_policy=1
  if [[ $had_policy = 0 ]]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  DEBIAN_FRONTEND=noninteractive nice -n 15 apt-get install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge > "$LOGDIR/apt-install.log" 2>&1 \
    || { [[ $had_policy = 1 ]] || rm -f /usr/sbin/policy-rc.d; die install "apt-get install failed" "$LOGDIR/apt-install.log"; }
  [[ $had_policy = 1 ]] || rm -f /usr/sbin/policy-rc.d
fi
echo "setup.sh: $(slurmctld -V)"

# 2. Munge: a key if missing, then munged as user munge; checked with a munge/unmunge round trip.
if [[ ! -s /etc/munge/munge.key ]]; then
  echo "setup.sh: creating /etc/munge/munge.key"
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  echo "setup.sh: starting munged"
  runuser -u munge -- /usr/sbin/munged 2>"$LOGDIR/munged.start.err" \
    || die munged "munged did not start" "$LOGDIR/munged.start.err" /var/log/munge/munged.log
  echo "munged /run/munge/munged.pid" >> "$STATE"
  munge -n | unmunge >/dev/null || die munged "munge/unmunge round trip fails" /var/log/munge/munged.log
fi

# 3. slurm.conf: one node with this machine's CPUs and 90% of its memory, one default partition.
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p /etc/slurm
cat > "$CONF" <<EOF
# Written by fastnet benchmarks/slurm/setup.sh: single-node Slurm, no cgroups, no accounting.
ClusterName=fastnet
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
PropagatePrioProcess=1
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
NodeName=$HOST CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld
install -d -m 0755 /var/spool/slurmd
chown slurm:slurm "$LOGDIR"

# 4. Daemons: slurmctld, then slurmd. A running daemon is told to re-read the new slurm.conf.
start() {                                # start NAME PIDFILE LOG: start unless running, check it stays up
  local name=$1 pidfile=$2 log=$3
  if running "$pidfile"; then scontrol reconfigure >/dev/null 2>&1 || true; return; fi
  echo "setup.sh: starting $name"
  "/usr/sbin/$name" 2>"$LOGDIR/$name.start.err" || die "$name" "$name exited with status $?" "$LOGDIR/$name.start.err" "$log"
  for _ in 1 2 3 4 5 6 7 8 9 10; do running "$pidfile" && break; sleep 0.5; done
  running "$pidfile" || die "$name" "$name is not running (no live pid in $pidfile)" "$LOGDIR/$name.start.err" "$log"
  echo "$name $pidfile" >> "$STATE"
}
start slurmctld /run/slurmctld.pid "$LOGDIR/slurmctld.log"
start slurmd /run/slurmd.pid "$LOGDIR/slurmd.log"

# 5. Wait (bounded) until the node is idle.
for (( t = 0; t < WAIT_S; t++ )); do
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null || true)
  [[ $state == idle ]] && { echo "setup.sh: ready"; sinfo; exit 0; }
  sleep 1
done
die wait "node $HOST is '${state:-unknown}' after ${WAIT_S}s, not idle ($(scontrol show node "$HOST" 2>&1 | grep -o 'Reason=.*' || true))" \
  "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log"
