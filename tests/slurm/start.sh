#!/usr/bin/env bash
# A one-node Slurm cluster for the `slurm` tests (and for trying the SLURM launcher by hand), everything under
# STATE_DIR: munged, slurmctld and slurmd on free ports, proctrack/linuxproc, task/none, select/cons_tres, no
# cgroups, no accounting; one node (this machine, all its CPUs) in one partition. Credentials live 10 s
# (cred_expire; Slurm's default is 120): a requeued job waits that long before it starts again, and must, since
# slurmd refuses to launch it while the revoked credential of its first attempt is alive.
#
#   tests/slurm/start.sh STATE_DIR              # start, print how to use it, run until Ctrl-C / SIGTERM
#   tests/slurm/start.sh STATE_DIR CMD ARGS...  # start, run CMD with SLURM_CONF set, stop; exit with CMD's status
#
# Clients need SLURM_CONF=STATE_DIR/slurm.conf (written to STATE_DIR/env; CMD gets it). When the node is idle the
# script writes STATE_DIR/ready. On exit (however it ends) it cancels the jobs left and stops the three daemons.
# Needs slurm-wlm and munge (Debian: apt-get install -y slurm-wlm munge); slurmd runs jobs as the user starting it.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 STATE_DIR [COMMAND ARGS...]" >&2; exit 2; fi
dir=$(mkdir -p "$1" && cd "$1" && pwd); shift
export PATH="$PATH:/usr/sbin:/sbin"
for tool in munged slurmctld slurmd sinfo; do
  command -v $tool > /dev/null || { echo "$0: $tool not found; install slurm-wlm and munge" >&2; exit 3; }
done
rm -f "$dir/ready"
mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
chmod 755 "$dir/munge"
user=$(id -un)
host=$(hostname -s)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

pids=()
stop() {
  trap - EXIT INT TERM
  if [ -e "$dir/env" ]; then scancel --user="$user" 2> /dev/null || true; sleep 1; fi
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2> /dev/null || true; done
  rm -f "$dir/ready" "$dir/env"
}
trap stop EXIT
trap 'exit 143' INT TERM

head -c 1024 /dev/urandom > "$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
munged --foreground --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" > "$dir/log/munged.out" 2>&1 &
pids+=($!)

cat > "$dir/slurm.conf" <<CONF
ClusterName=ddotest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=5
KillWait=2
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
echo "export SLURM_CONF=$SLURM_CONF" > "$dir/env"

for _ in $(seq 100); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done
slurmctld -D -i > "$dir/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -N "$host" > "$dir/log/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  [ "$(sinfo -h -N -o %t 2> /dev/null)" = idle ] && break
  sleep 0.2
done
if [ "$(sinfo -h -N -o %t 2> /dev/null)" != idle ]; then
  echo "$0: the node did not come up idle in 60 s; see $dir/log" >&2
  tail -n 5 "$dir"/log/*.log "$dir"/log/*.out >&2 || true
  exit 1
fi
touch "$dir/ready"
if [ $# -gt 0 ]; then
  set +e
  "$@"
  rc=$?
  exit $rc
fi
echo "Slurm $(sinfo -V | cut -d' ' -f2) is up: node $host, $(nproc) CPUs. In another shell: . $dir/env"
sleep infinity &
wait $! || true
