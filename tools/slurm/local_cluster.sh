#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and trying `omnimask submit`:
# munge, slurmctld and slurmd from Debian's packages, no systemd, all state under one
# directory ($OMNIMASK_SLURM_DIR, default /tmp/omnimask-slurm). Needs root (slurmd
# starts jobs as their users).
#   tools/slurm/local_cluster.sh start|stop|status|env
#   eval "$(tools/slurm/local_cluster.sh env)"   # SLURM_CONF for sbatch, squeue, submitit
set -euo pipefail
DIR=${OMNIMASK_SLURM_DIR:-/tmp/omnimask-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
SBIN=/usr/sbin

die() { echo "local_cluster: $*" >&2; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  local cpus mem
  cpus=$(nproc)
  ((cpus < 8)) && cpus=8  # config_overrides: the tests run 2-task jobs side by side
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat > "$CONF" <<CONF
ClusterName=omnimask-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${OMNIMASK_SLURMCTLD_PORT:-6817}
SlurmdPort=${OMNIMASK_SLURMD_PORT:-6818}
JobRequeue=1
ReturnToService=2
KillWait=15
MinJobAge=600
InactiveLimit=0
OverTimeLimit=0
SchedulerParameters=bf_interval=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  [[ $(id -u) == 0 ]] || die "needs root (slurmd runs jobs as their users)"
  for b in munged slurmctld slurmd; do
    [[ -x $SBIN/$b ]] || die "$SBIN/$b not found: apt-get install slurmctld slurmd slurm-client munge"
  done
  if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
    echo "already running ($DIR)"; return
  fi
  mkdir -p "$DIR"/{munge,state,spool}
  chmod 700 "$DIR/munge"
  write_conf
  if ! pid_alive "$DIR/munge/munged.pid"; then
    [[ -f $DIR/munge/munge.key ]] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    $SBIN/munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
      --seed-file="$DIR/munge/munged.seed"
  fi
  SLURM_CONF=$CONF $SBIN/slurmctld -f "$CONF" -i
  SLURM_CONF=$CONF $SBIN/slurmd -f "$CONF" -N "$HOST"
  export SLURM_CONF=$CONF
  for _ in $(seq 60); do  # the node registers, then takes jobs
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "SLURM up: node $HOST, state in $DIR; export SLURM_CONF=$CONF"; return
    fi
    sleep 0.5
  done
  tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
  die "the node did not come up (logs above, in $DIR)"
}

stop() {
  [[ -f $CONF ]] && SLURM_CONF=$CONF scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
  for f in slurmd slurmctld munge/munged; do
    if pid_alive "$DIR/$f.pid"; then
      kill "$(cat "$DIR/$f.pid")" 2>/dev/null || true
      for _ in $(seq 40); do pid_alive "$DIR/$f.pid" || break; sleep 0.25; done
      pid_alive "$DIR/$f.pid" && kill -9 "$(cat "$DIR/$f.pid")" 2>/dev/null || true
    fi
    rm -f "$DIR/$f.pid"
  done
  echo "SLURM stopped ($DIR kept: logs, state)"
}

status() {
  local ok=0
  for f in munge/munged slurmctld slurmd; do
    if pid_alive "$DIR/$f.pid"; then echo "${f#munge/}: running (pid $(cat "$DIR/$f.pid"))"
    else echo "${f#munge/}: stopped"; ok=1; fi
  done
  if ((ok == 0)); then SLURM_CONF=$CONF sinfo; fi
  return $ok
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
