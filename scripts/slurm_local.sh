#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for tests and CI (Debian/Ubuntu, needs root).
#
#   bash scripts/slurm_local.sh start     # install slurm-wlm + munge if missing, write the config, start the daemons
#   eval "$(bash scripts/slurm_local.sh env)"   # -> export SLURM_CONF=...  (sbatch/srun/squeue need it)
#   . /tmp/lmrec-slurm/env.sh                    # the same, as a file (written by start)
#   bash scripts/slurm_local.sh status    # sinfo + squeue
#   bash scripts/slurm_local.sh stop      # stop slurmd, slurmctld and the munged we started
#
# State, logs and the config live in $LMREC_SLURM_DIR (default /tmp/lmrec-slurm), never in /etc/slurm,
# so the script neither needs nor touches a system-wide SLURM config. Idempotent: `start` installs
# packages only when a binary is missing and starts only daemons that are not already running.
# The configuration is the one measured in /work/shared/notes/distributed-cpu-recipes.md:
# NodeName=localhost (slurmd -N localhost, independent of the real hostname), proctrack/linuxproc and
# task/none (no cgroups needed), jobcomp/filetxt (`sacct -c` works without slurmdbd) and
# AuthInfo=cred_expire=10 (a requeued job becomes eligible again after ~10 s instead of 120 s).
# Expected time: ~10 s for apt on first use, ~2 s for the daemons.
set -euo pipefail

DIR="${LMREC_SLURM_DIR:-/tmp/lmrec-slurm}"
CONF="$DIR/slurm.conf"

log() { echo "[slurm_local] $*" >&2; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

# A pid file names a live daemon only if that pid runs the daemon the file is named after and is not a
# zombie: after a machine's processes were killed (CI starts right after a session ends) the pid may be
# reused by anything, or left as <defunct>, and `kill -0` alone would call the cluster "running".
pid_alive() {
  [[ -f "$1" ]] || return 1
  local pid name
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  name=$(basename "$1" .pid)
  [[ -r /proc/$pid/stat ]] || return 1
  [[ "$(cat /proc/$pid/comm 2>/dev/null)" == "$name" ]] || return 1
  [[ "$(awk '{print $3}' /proc/$pid/stat 2>/dev/null)" != Z ]]
}

install_if_missing() {
  local missing=0
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged /usr/bin/munge; do
    [[ -x "$b" ]] || missing=1
  done
  if [[ $missing == 0 ]]; then return 0; fi
  [[ $(id -u) == 0 ]] || die "slurm/munge are not installed and this is not root: run 'apt-get install slurmctld slurmd slurm-client munge' as root"
  command -v apt-get >/dev/null || die "slurm/munge are not installed and apt-get is missing (Debian/Ubuntu only)"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # postinst scripts try to start the services via invoke-rc.d; a policy-rc.d may deny that, which is harmless
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,out}
  local cpus mem_mb
  cpus=$(nproc)
  # RealMemory in MB, 90% of MemTotal so slurmd does not drain the node for "low memory"
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  cat >"$CONF.tmp" <<EOF
# written by scripts/slurm_local.sh; single-node test cluster on localhost
ClusterName=lmrec-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
  echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"   # `. $DIR/env.sh` (what .ci/run does)
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/munged.started"   # `stop` only stops a munged that this script started
  for _ in $(seq 50); do
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "munged did not come up (munge -n | unmunge fails)"
}

start() {
  install_if_missing
  if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
    log "already running (config $CONF)"
  else
    write_conf
    start_munge
    export SLURM_CONF="$CONF"
    # -c: a fresh test cluster; jobs of an earlier, dead cluster in $DIR/state are dropped on purpose
    pid_alive "$DIR/slurmctld.pid" || /usr/sbin/slurmctld -c -f "$CONF"
    pid_alive "$DIR/slurmd.pid" || /usr/sbin/slurmd -f "$CONF" -N localhost
  fi
  export SLURM_CONF="$CONF"
  local state=""
  for _ in $(seq 100); do
    state=$(timeout 5 sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true)
    if [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]; then
      log "up: node localhost $state, $(nproc) CPUs; export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.2
  done
  die "node did not become idle (state '$state'); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

stop() {
  local p
  for p in slurmd slurmctld; do
    if pid_alive "$DIR/$p.pid"; then
      kill "$(cat "$DIR/$p.pid")"
      for _ in $(seq 50); do pid_alive "$DIR/$p.pid" || break; sleep 0.1; done
      log "stopped $p"
    fi
  done
  # munged writes its pid file to the Debian default location; stop it only if this script started it
  if [[ -f "$DIR/munged.started" ]] && pid_alive /run/munge/munged.pid; then
    kill "$(cat /run/munge/munged.pid)" && log "stopped munged"
  fi
  rm -f "$DIR/munged.started"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status)
    export SLURM_CONF="$CONF"
    sinfo -N -l && squeue -a ;;
  *) die "usage: $0 start|stop|restart|status|env" ;;
esac
