#!/usr/bin/env bash
# A real local SLURM cluster (Debian's slurm-wlm) for tests and trying out slurm/pretrain.sbatch:
# slurmctld + two slurmd ("node1", "node2": both on 127.0.0.1, own ports) + munge + slurmdbd on MariaDB
# (unix socket only), so sacct works and one job can span 2 SLURM nodes.
#
#   bash scripts/local_slurm.sh start    # install the Debian packages if missing, start what is not running
#   bash scripts/local_slurm.sh status   # daemons, pids, sinfo; exit 0 when all run, 3 otherwise
#   bash scripts/local_slurm.sh stop     # cancel the cluster's jobs, stop the daemons it started (pid files)
#   bash scripts/local_slurm.sh env      # print `export SLURM_CONF=...` (eval "$(bash scripts/local_slurm.sh env)")
#
# Everything lives under $MMPT_LOCAL_SLURM_DIR (default /tmp/mmpt-slurm): etc/ (slurm.conf, slurmdbd.conf),
# spool/, log/, run/ (pid files), munge/ (key, socket), mysql/ (data dir, socket). Clients find the
# config through SLURM_CONF; when /etc/slurm/slurm.conf does not exist, `start` also links it there (and
# `stop` removes that link) so plain `sbatch`/`srun`/`sinfo` work in any shell.
# Needs root and apt-get (Debian bookworm: slurm-wlm 22.05) the first time; then only root.
# Exit codes: 0 ok, 1 failed (the message names the log to read), 2 usage, 3 `status`: not (all) running,
# 4 this machine cannot host it (not root, no apt-get, no Debian slurm packages): tests skip on 4.
# Settings: MMPT_LOCAL_SLURM_CPUS (CPUs each node advertises, default 4: enough for 4 ranks on one node
# whatever the real core count, via SlurmdParameters=config_overrides), MMPT_LOCAL_SLURM_PORT (first of 4
# consecutive ports: slurmctld, node1, node2, slurmdbd; default 6817).
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"  # the daemons live in sbin

STATE="${MMPT_LOCAL_SLURM_DIR:-/tmp/mmpt-slurm}"
CPUS="${MMPT_LOCAL_SLURM_CPUS:-4}"
PORT0="${MMPT_LOCAL_SLURM_PORT:-6817}"
CLUSTER=mmpt
PARTITION=debug
NODES=(node1 node2)
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DAEMONS=(mariadb munged slurmdbd slurmctld slurmd-node1 slurmd-node2)

CONF="$STATE/etc/slurm.conf"
DBD_CONF="$STATE/etc/slurmdbd.conf"
RUN="$STATE/run"
LOG="$STATE/log"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
MYSQL_DIR="$STATE/mysql"
MYSQL_SOCKET="$MYSQL_DIR/mysqld.sock"
ETC_LINK=/etc/slurm/slurm.conf
MADE_POLICY=0

say() { echo "[local_slurm] $*"; }
die() { echo "[local_slurm] error: $*" >&2; exit 1; }
cannot() { echo "[local_slurm] cannot run here: $*" >&2; exit 4; }  # exit 4: this machine cannot host it

pid_of() {  # pid of a daemon we started, when its pid file names a live process of that program
  local file="$RUN/$1.pid" pid prog
  [ -s "$file" ] || return 1
  pid="$(tr -dc '0-9' < "$file")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  case "$1" in mariadb) prog=mariadbd ;; slurmd-*) prog=slurmd ;; *) prog="$1" ;; esac
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$prog" ] || return 1  # a stale pid file, its pid reused
  echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll a command until it succeeds
  local limit="$1" what="$2" t0=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - t0 >= limit )); then
      return 1
    fi
    sleep 0.2
  done
}

log_tail() {  # the last lines of a log file, for error messages
  [ -f "$1" ] && { echo "---- last lines of $1:" >&2; tail -n 20 "$1" >&2; } || true
}

need_root() {
  [ "$(id -u)" = 0 ] || cannot "must run as root (it installs Debian packages and runs slurmctld/slurmd/slurmdbd/munged/mariadbd as system daemons); you are $(id -un)"
}

have_binaries() {
  local b
  for b in slurmctld slurmd slurmdbd sbatch srun sacct scontrol munged munge mungekey mariadbd mariadb-install-db mariadb; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || [ -x "/usr/bin/$b" ] || return 1
  done
}

install_packages() {
  have_binaries && return 0
  command -v apt-get >/dev/null 2>&1 || cannot "SLURM is not installed and apt-get is not available (needs a Debian/Ubuntu machine with slurm-wlm packages: ${PACKAGES[*]})"
  say "installing Debian packages: ${PACKAGES[*]}"
  # Without systemd the packages' postinst scripts would start the daemons before any config exists:
  # a policy-rc.d that says 101 stops that. Ours is removed afterwards; an existing one is left alone.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when interrupted
    printf '#!/bin/sh\n# temporary, from mmpt scripts/local_slurm.sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    MADE_POLICY=1
  fi
  local rc=0 apt_log="$LOG/apt.log"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$apt_log" 2>&1; then
    say "apt-get install failed; running apt-get update and trying again"
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } >>"$apt_log" 2>&1 || rc=$?
  fi
  if [ "$MADE_POLICY" = 1 ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  if [ "$rc" != 0 ]; then
    log_tail "$apt_log"
    if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
      cannot "the Debian packages ${PACKAGES[*]} are not available from this machine's apt sources (log: $apt_log)"
    fi
    die "could not install ${PACKAGES[*]} with apt-get (log: $apt_log)"
  fi
  have_binaries || die "packages installed but some binaries are missing (log: $apt_log)"
}

write_configs() {
  local host cpus_line i port
  host="$(hostname -s)"
  cpus_line="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=1000"
  mkdir -p "$STATE/etc" "$STATE/spool/ctld" "$RUN" "$LOG"
  {
    echo "# written by scripts/local_slurm.sh; regenerated at every start"
    echo "ClusterName=$CLUSTER"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$PORT0"
    echo "SlurmdPort=$((PORT0 + 1))"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET"
    echo "StateSaveLocation=$STATE/spool/ctld"
    echo "SlurmdSpoolDir=$STATE/spool/slurmd-%n"
    echo "SlurmctldPidFile=$RUN/slurmctld.pid"
    echo "SlurmdPidFile=$RUN/slurmd-%n.pid"
    echo "SlurmctldLogFile=$LOG/slurmctld.log"
    echo "SlurmdLogFile=$LOG/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SlurmdParameters=config_overrides"
    echo "SchedulerType=sched/backfill"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "JobRequeue=1"
    echo "ReturnToService=2"
    echo "EnforcePartLimits=ALL"
    echo "KillWait=10"
    echo "InactiveLimit=0"
    echo "AccountingStorageType=accounting_storage/slurmdbd"
    echo "AccountingStorageHost=127.0.0.1"
    echo "AccountingStoragePort=$((PORT0 + 3))"
    echo "AccountingStoragePass=$MUNGE_SOCKET"  # for slurmdbd connections this names the munge socket
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    for i in "${!NODES[@]}"; do
      port=$((PORT0 + 1 + i))
      echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$port $cpus_line State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF"
  {
    echo "# written by scripts/local_slurm.sh"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET"
    echo "DbdHost=localhost"
    echo "DbdAddr=127.0.0.1"
    echo "DbdPort=$((PORT0 + 3))"
    echo "SlurmUser=root"
    echo "PidFile=$RUN/slurmdbd.pid"
    echo "LogFile=$LOG/slurmdbd.log"
    echo "StorageType=accounting_storage/mysql"
    echo "StorageHost=localhost"
    echo "StorageUser=root"
    echo "StorageLoc=slurm_acct_db"
  } > "$DBD_CONF"
  chmod 600 "$DBD_CONF"
}

ensure_hostname_resolves() {
  local host
  host="$(hostname -s)"
  if ! getent hosts "$host" >/dev/null 2>&1; then
    say "adding '127.0.0.1 $host' to /etc/hosts (the controller's host name must resolve)"
    echo "127.0.0.1 $host  # mmpt local_slurm" >> /etc/hosts
  fi
}

start_munge() {
  if running munged; then return 0; fi
  mkdir -p "$MUNGE_DIR"
  chown munge:munge "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key" >/dev/null
  fi
  chown munge:munge "$MUNGE_DIR/munge.key"
  chmod 600 "$MUNGE_DIR/munge.key"
  touch "$RUN/munged.pid" "$LOG/munged.log"
  chown munge:munge "$RUN/munged.pid" "$LOG/munged.log"
  rm -f "$MUNGE_SOCKET"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
    9>&- </dev/null >>"$LOG/munged.log" 2>&1 || { log_tail "$LOG/munged.log"; die "munged did not start"; }
  munge_ok() { munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET"; }
  wait_for 10 munge munge_ok || { log_tail "$LOG/munged.log"; die "munge does not answer on $MUNGE_SOCKET"; }
}

start_mariadb() {
  if running mariadb; then return 0; fi
  if [ ! -d "$MYSQL_DIR/data/mysql" ]; then
    mkdir -p "$MYSQL_DIR/data"
    mariadb-install-db --no-defaults --datadir="$MYSQL_DIR/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
      || { log_tail "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  rm -f "$MYSQL_SOCKET"
  setsid mariadbd --no-defaults --datadir="$MYSQL_DIR/data" --socket="$MYSQL_SOCKET" --skip-networking \
    --user=root --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --performance-schema=OFF \
    9>&- </dev/null >>"$LOG/mariadb.log" 2>&1 &
  db_ok() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root -e 'select 1'; }
  wait_for 60 mariadb db_ok || { log_tail "$LOG/mariadb.log"; die "mariadb did not start"; }
  wait_for 10 "mariadb pid" running mariadb || die "mariadb runs but wrote no pid file $RUN/mariadb.pid"
}

start_slurmdbd() {
  if running slurmdbd; then return 0; fi
  # slurmdbd reaches MariaDB through its unix socket ("localhost"); libmariadb reads the path from here
  MYSQL_UNIX_PORT="$MYSQL_SOCKET" SLURM_CONF="$CONF" slurmdbd 9>&- </dev/null >>"$LOG/slurmdbd.log" 2>&1 \
    || { log_tail "$LOG/slurmdbd.log"; die "slurmdbd did not start"; }
  dbd_ok() { SLURM_CONF="$CONF" sacctmgr -n -P show cluster format=cluster; }
  wait_for 30 slurmdbd dbd_ok || { log_tail "$LOG/slurmdbd.log"; die "slurmdbd does not answer"; }
  if ! SLURM_CONF="$CONF" sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    SLURM_CONF="$CONF" sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurmctld() {
  if running slurmctld; then return 0; fi
  SLURM_CONF="$CONF" slurmctld 9>&- </dev/null >>"$LOG/slurmctld.log" 2>&1 \
    || { log_tail "$LOG/slurmctld.log"; die "slurmctld did not start"; }
  ctld_ok() { SLURM_CONF="$CONF" scontrol ping | grep -q UP; }
  wait_for 30 slurmctld ctld_ok || { log_tail "$LOG/slurmctld.log"; die "slurmctld does not answer"; }
}

start_slurmd() {
  local node="$1"
  if running "slurmd-$node"; then return 0; fi
  mkdir -p "$STATE/spool/slurmd-$node"
  SLURM_CONF="$CONF" slurmd -N "$node" 9>&- </dev/null >>"$LOG/slurmd-$node.log" 2>&1 \
    || { log_tail "$LOG/slurmd-$node.log"; die "slurmd -N $node did not start"; }
}

all_idle() {  # every node answers and is idle (or allocated/mixed: it is running jobs)
  local states
  states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
  [ "$(echo "$states" | grep -cE ' (idle|mixed|allocated|completing)$')" = "${#NODES[@]}" ]
}

link_etc_conf() {
  if [ ! -e "$ETC_LINK" ] && [ ! -L "$ETC_LINK" ]; then
    mkdir -p "$(dirname "$ETC_LINK")"
    ln -s "$CONF" "$ETC_LINK"
    echo "$ETC_LINK" > "$RUN/etc-link"
  fi
}

lock() {  # one start/stop at a time (parallel test sessions share the cluster)
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 600 9 || die "could not lock $STATE/.lock within 600 s"
}

cmd_start() {
  need_root
  lock
  mkdir -p "$STATE" "$LOG" "$RUN"
  chmod 755 "$STATE"
  if status_quiet; then
    say "already running (state in $STATE); nothing to do"
    print_env_hint
    return 0
  fi
  local t0=$SECONDS
  install_packages
  ensure_hostname_resolves
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  local node
  for node in "${NODES[@]}"; do start_slurmd "$node"; done
  if ! wait_for 60 "nodes idle" all_idle; then
    SLURM_CONF="$CONF" sinfo -N >&2 || true
    for node in "${NODES[@]}"; do log_tail "$LOG/slurmd-$node.log"; done
    log_tail "$LOG/slurmctld.log"
    die "the nodes did not become idle"
  fi
  link_etc_conf
  say "up in $((SECONDS - t0)) s: cluster $CLUSTER, partition $PARTITION, nodes ${NODES[*]} ($CPUS CPUs each), accounting on (state in $STATE)"
  print_env_hint
}

print_env_hint() {
  say "clients: export SLURM_CONF=$CONF"
}

stop_daemon() {  # stop_daemon NAME: TERM the pid of its pid file, wait, KILL if needed
  local name="$1" pid i
  pid="$(pid_of "$name")" || { rm -f "$RUN/$name.pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
  say "stopped $name (pid $pid)"
}

cmd_stop() {
  need_root
  if [ ! -d "$RUN" ]; then
    say "nothing to stop (no $RUN)"
    return 0
  fi
  lock
  if [ ! -d "$RUN" ]; then
    say "nothing to stop (no $RUN)"
    return 0
  fi
  if running slurmctld; then  # jobs would come back (requeued) at the next start: cancel them now
    SLURM_CONF="$CONF" scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
    SLURM_CONF="$CONF" scancel --quiet --partition="$PARTITION" 2>/dev/null || true
    sleep 0.5
  fi
  local node
  for node in "${NODES[@]}"; do stop_daemon "slurmd-$node"; done
  stop_daemon slurmctld
  stop_daemon slurmdbd
  stop_daemon mariadb
  stop_daemon munged
  if [ -f "$RUN/etc-link" ]; then
    local link
    link="$(cat "$RUN/etc-link")"
    [ -L "$link" ] && [ "$(readlink "$link")" = "$CONF" ] && rm -f "$link"
    rm -f "$RUN/etc-link"
  fi
  say "stopped (state kept in $STATE; remove it for a fresh cluster)"
}

status_quiet() {
  local d
  for d in "${DAEMONS[@]}"; do running "$d" || return 1; done
  all_idle
}

cmd_status() {
  local d pid ok=0
  for d in "${DAEMONS[@]}"; do
    if pid="$(pid_of "$d")"; then
      printf '%-14s running (pid %s)\n' "$d" "$pid"
    else
      printf '%-14s not running\n' "$d"
      ok=3
    fi
  done
  if running slurmctld; then
    SLURM_CONF="$CONF" sinfo -N -o '%N %P %T %c' || ok=3
    all_idle || ok=3
  fi
  echo "state: $STATE   clients: export SLURM_CONF=$CONF"
  return "$ok"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (state dir: \$MMPT_LOCAL_SLURM_DIR, default /tmp/mmpt-slurm)" >&2; exit 2 ;;
esac
