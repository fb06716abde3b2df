#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost for the project's SLURM tests and CI: munge, slurmctld,
# slurmd, slurmdbd on MariaDB (so sacct works) and an sshd on 127.0.0.1, all from Debian packages and
# started without systemd. Configs, keys, state and logs live under .data/slurm (CURATION_SLURM_STATE).
#
# Every clone runs a cluster of its own: its ports (a free block of five, chosen at the first `up` and
# kept in etc/ports), its munged (own socket) and its sshd, so two clones on one machine never answer
# each other's jobs and one clone's `down` never stops the other's daemons. What sshd and munged check
# for safe ownership along the whole path (authorized_keys, munge socket) lives in a root-owned folder
# under /run/curation-slurm/, and MariaDB's datadir (the mysql user must reach it) under
# /var/lib/curation-slurm/, both named by a hash of the state folder: a clone may sit under a
# world-writable folder such as /tmp, which sshd's StrictModes refuses, or under a private one such
# as /root, which the mysql user cannot enter.
#
#   scripts/slurm.sh up       install what is missing, (re)start what is down, wait for an idle node
#   scripts/slurm.sh down     cancel jobs, stop every daemon this script started
#   scripts/slurm.sh purge    down, then delete this clone's cluster files (state, accounting DB, keys)
#   scripts/slurm.sh status   one line per daemon, then sinfo; exit 1 unless everything runs
#   scripts/slurm.sh check    log in over SSH as the tests do (key, strict host key, scp); exit 1 with
#                             the reason and the SSH client's and sshd's own words when that fails
#   scripts/slurm.sh env      export lines for tests and CI: eval "$(scripts/slurm.sh env)"
#                             (CURATION_SLURM_ENV names the job environment; scripts/slurm-env.sh builds it)
#
# Facts and pitfalls behind each choice: shared/reference/slurm-local.md. Runs as root (jobs run as root).
set -euo pipefail
trap '' PIPE  # a reader that goes away (| head) must not kill us between a stop and a start

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${CURATION_SLURM_STATE:-$ROOT/.data/slurm}
ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log SSHDIR=$STATE/ssh
CLUSTER=curation ACCOUNT=curation PARTITION=cpu GPU_PARTITION=gpu
NODE=$(hostname -s)
CPUS=${CURATION_SLURM_CPUS:-8}  # oversubscribes the real cores (config_overrides): more jobs at once
GPUS=${CURATION_SLURM_GPUS:-1}  # fake GPUs: character devices with no driver behind them
# Folder for files whose whole path sshd and munged check for safe ownership: root-owned, outside the clone.
ID=$(printf '%s' "$STATE" | sha256sum | cut -c1-12)
SYS=${CURATION_SLURM_SYS:-/run/curation-slurm/$ID}
MUNGE_DIR=$SYS/munge MUNGE_SOCKET=$SYS/munge/munge.socket
AUTHORIZED_KEYS=$SYS/authorized_keys
PORTS_FILE=$ETC/ports  # SSH_PORT CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT, chosen once per clone
VAR=${CURATION_SLURM_VAR:-/var/lib/curation-slurm/$ID}  # persistent files of daemons that do not run as root
DB=$VAR/mysql  # MariaDB's datadir, socket and PID file (the accounting); its log is $VAR/mariadb.log
JOB_USER=root
export SLURM_CONF=$ETC/slurm.conf

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd slurm-wlm-mysql-plugin mariadb-server openssh-server)

log() { echo "slurm.sh: $*" >&2 || true; }  # a closed stderr must not abort a start half-way
die() { log "$*"; exit 1; }

# The port the generated sshd_config holds (what `env` and `check` use).
configured_ssh_port() {
  [ -f "$SSHDIR/sshd_config" ] || die "no cluster configured under $STATE: run scripts/slurm.sh up first"
  awk '$1 == "Port" {print $2}' "$SSHDIR/sshd_config"
}

# Poll CMD every 0.1 s for up to SECONDS; fail with WHAT.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${seconds}s waiting for $what (logs: $LOG)"
    sleep 0.1
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Every TCP port something listens on, any address (from /proc: no ss/netstat needed).
listening_ports() {
  awk 'NR > 1 && $4 == "0A" {split($2, a, ":"); print strtonum("0x" a[2])}' /proc/net/tcp /proc/net/tcp6 2>/dev/null \
    | sort -un
}

# ports_free PORT...: none of them is listened on.
ports_free() {
  local busy p
  busy=" $(listening_ports | tr '\n' ' ') "
  for p in "$@"; do [[ $busy != *" $p "* ]] || return 1; done
}

# Load this clone's ports, choosing a free block of five the first time (or when the recorded block was
# taken by something else while none of our daemons ran). The search starts at a block derived from the
# state folder's hash, in 20000-29999 (below Linux's ephemeral range), so clones rarely even probe.
# CURATION_SLURM_PORT pins the sshd port.
choose_ports() {
  if [ -f "$PORTS_FILE" ]; then
    # shellcheck disable=SC1090
    source "$PORTS_FILE"
    if [ -n "${CURATION_SLURM_PORT:-}" ] && [ "$CURATION_SLURM_PORT" != "$SSH_PORT" ]; then
      log "CURATION_SLURM_PORT=$CURATION_SLURM_PORT differs from the recorded sshd port $SSH_PORT: restarting on new ports"
      cmd_down  # daemons started with the old ports (mariadbd takes its port on the command line)
    elif any_daemon_alive || ports_free "$SSH_PORT" "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; then
      return 0
    else
      log "recorded ports ($PORTS_FILE) are taken by another program: choosing new ones"
    fi
  fi
  local base=$((20000 + 16#${ID:0:4} % 2000 * 5)) tries ssh
  for ((tries = 0; tries < 2000; tries++)); do
    ssh=${CURATION_SLURM_PORT:-$base}
    if ports_free "$ssh" $((base + 1)) $((base + 2)) $((base + 3)) $((base + 4)); then
      SSH_PORT=$ssh CTLD_PORT=$((base + 1)) SLURMD_PORT=$((base + 2)) DBD_PORT=$((base + 3)) DB_PORT=$((base + 4))
      printf 'SSH_PORT=%s CTLD_PORT=%s SLURMD_PORT=%s DBD_PORT=%s DB_PORT=%s\n' \
        "$SSH_PORT" "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT" >"$PORTS_FILE.tmp"
      mv -f "$PORTS_FILE.tmp" "$PORTS_FILE"
      log "ports: sshd $SSH_PORT, slurmctld $CTLD_PORT, slurmd $SLURMD_PORT, slurmdbd $DBD_PORT, mariadb $DB_PORT"
      return 0
    fi
    base=$((base + 5 > 29995 ? 20000 : base + 5))
  done
  die "no free block of five ports in 20000-29999"
}

# proc_is PID COMM: PID is a COMM process and not a zombie (PID 1 here reaps slowly, about 1.5 s).
proc_is() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  [[ $stat == "$1 ($2) "[^Z]* ]]
}

# alive NAME COMM: the PID recorded in $RUN/NAME.pid is a live COMM process. Daemons are only ever
# signalled through these files, never by name.
alive() {
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && proc_is "$pid" "$2"
}

any_daemon_alive() {
  alive munged munged || alive mariadbd mariadbd || alive slurmdbd slurmdbd || alive slurmctld slurmctld \
    || alive slurmd slurmd || alive sshd sshd
}

# stop NAME COMM: TERM the recorded daemon, wait up to 20 s, then KILL; forget the PID file.
# For sshd its connection processes go first: they outlive the listener, and an SSH ControlMaster
# connected through one would carry commands into this stopped cluster for minutes.
stop() {
  local name=$1 comm=$2 pid
  if alive "$name" "$comm"; then
    pid=$(cat "$RUN/$name.pid")
    [ "$name" != sshd ] || pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while proc_is "$pid" "$comm" && [ "$SECONDS" -lt "$deadline" ]; do
      sleep 0.1
    done
    if proc_is "$pid" "$comm"; then
      log "$name ($pid) ignored SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "$RUN/$name.pid"
}

# write_if_changed FILE MODE: store stdin in FILE (mode MODE) unless it already holds exactly that;
# succeed only when the file changed, so daemons restart only for a real config change.
write_if_changed() {
  local file=$1 mode=$2 tmp
  tmp=$(mktemp "$file.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [ -f "$file" ] && cmp -s "$tmp" "$file"; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$file"
}

install_packages() {
  local missing=() pkg status
  # One dpkg-query for all: the common case is "all installed", and it must stay fast.
  status=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
  for pkg in "${PACKAGES[@]}"; do
    [[ $'\n'"$status"$'\n' == *$'\n'"$pkg installed"$'\n'* ]] || missing+=("$pkg")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}) and not root"
  log "installing ${missing[*]}"
  # policy-rc.d keeps the postinsts from starting the system's munge, mariadb and sshd on port 22.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$LOG/apt.log" 2>&1; then
    apt-get update -qq >>"$LOG/apt.log" 2>&1  # a fresh machine has stale or no package lists
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG/apt.log" 2>&1 \
      || { [ $created_policy = 0 ] || rm -f "$policy"; die "apt-get install failed; see $LOG/apt.log"; }
  fi
  [ $created_policy = 0 ] || rm -f "$policy"
}

# Fake GPUs: NVIDIA's major number with no driver behind it. Slurm only wants character devices
# (regular files draw an error; /dev/null for every GPU would make them indistinguishable).
make_gpu_devices() {
  mkdir -p "$STATE/dev"
  local i
  for ((i = 0; i < GPUS; i++)); do
    [ -c "$STATE/dev/nvidia$i" ] || mknod "$STATE/dev/nvidia$i" c 195 "$i"
  done
}

write_configs() {
  local mem
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024) - 1024}' /proc/meminfo)
  SLURM_CHANGED=0 DBD_CHANGED=0 SSH_CHANGED=0
  # KillWait=1 and OverTimeLimit=0: a job past its walltime is killed as soon as slurmctld notices.
  write_if_changed "$ETC/slurm.conf" 644 <<EOF && SLURM_CHANGED=1
# Generated by scripts/slurm.sh; edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
# slurmctld authenticates to slurmdbd through this munge socket, not AuthInfo's: without it, it would use
# the system's /run/munge socket (and die at start when no system munged runs).
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MinJobAge=300
KillWait=1
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=$GPU_PARTITION Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
  write_if_changed "$ETC/gres.conf" 644 <<EOF && SLURM_CHANGED=1
AutoDetect=off
NodeName=$NODE Name=gpu File=$STATE/dev/nvidia[0-$((GPUS - 1))]
EOF
  # The DB password is per state dir; MariaDB listens on 127.0.0.1 only.
  [ -s "$ETC/dbpass" ] || (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$ETC/dbpass")
  write_if_changed "$ETC/slurmdbd.conf" 600 <<EOF && DBD_CHANGED=1
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$(cat "$ETC/dbpass")
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
EOF
  # Remote commands run as `bash --noprofile --norc`: SetEnv hands them our SLURM_CONF.
  write_if_changed "$SSHDIR/sshd_config" 600 <<EOF && SSH_CHANGED=1
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSHDIR/host_ed25519
PidFile $RUN/sshd.pid
AuthorizedKeysFile $AUTHORIZED_KEYS
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
MaxSessions 50
MaxStartups 50:30:100
SetEnv SLURM_CONF=$SLURM_CONF
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
  return 0
}

# Host key, the job user's client key (authorized) and a known_hosts for strict host key checking.
# authorized_keys goes to $SYS: StrictModes refuses it when any folder above it is group- or
# world-writable, and a clone under /tmp has one.
write_ssh_keys() {
  [ -f "$SSHDIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "curation-slurm-host" -f "$SSHDIR/host_ed25519"
  [ -f "$SSHDIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "curation-slurm-$JOB_USER" -f "$SSHDIR/id_ed25519"
  install -m 600 "$SSHDIR/id_ed25519.pub" "$AUTHORIZED_KEYS.tmp"
  mv -f "$AUTHORIZED_KEYS.tmp" "$AUTHORIZED_KEYS"
  echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$SSHDIR/host_ed25519.pub")" >"$SSHDIR/known_hosts"
}

# install_sys_dir: $SYS and its parents root-owned and not group/world-writable (what StrictModes and
# munged's path checks want).
install_sys_dir() {
  install -d -o root -g root -m 0755 "$(dirname "$SYS")" "$SYS"
  local dir=$SYS
  while [ "$dir" != / ]; do
    dir=$(dirname "$dir")
    # shellcheck disable=SC2012
    [ "$(stat -c '%u' "$dir")" = 0 ] && [ $(( 8#$(stat -c '%a' "$dir") & 8#022 )) = 0 ] \
      || die "$dir must be root-owned and not group/world-writable (sshd's StrictModes); set CURATION_SLURM_SYS"
  done
}

munge_ok() { munge --socket="$MUNGE_SOCKET" -n 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1; }

# Our own munged on our own socket (slurm.conf's AuthInfo), with the machine's key: the system's munged,
# or another clone's, may come and go.
start_munge() {
  if alive munged munged && munge_ok; then return 0; fi
  stop munged munged
  if [ ! -f /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"  # /run is tmpfs: recreate on every start
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" </dev/null \
    || die "munged did not start; see $MUNGE_DIR/munged.log"
  wait_for "munged on $MUNGE_SOCKET (see $MUNGE_DIR/munged.log)" 10 munge_ok
  cp "$MUNGE_DIR/munged.pid" "$RUN/munged.pid"
  log "started munged ($(cat "$RUN/munged.pid")) on $MUNGE_SOCKET"
}

# root administers through the socket (unix_socket authentication); slurmdbd connects over TCP.
sql() { mariadb --no-defaults --socket="$DB/mysqld.sock" -u root "$@"; }

# A private MariaDB instance (--no-defaults: nothing from /etc/mysql, no clash with a system server).
start_mariadb() {
  if alive mariadbd mariadbd; then return 0; fi
  if [ ! -d "$DB/mysql" ]; then
    install -d -o root -g root -m 0755 "$(dirname "$VAR")" "$VAR"
    install -d -o mysql -g mysql -m 0750 "$DB"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed; see $LOG/mariadb-install.log"
  fi
  touch "$VAR/mariadb.log" && chown mysql:mysql "$VAR/mariadb.log"
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB" --socket="$DB/mysqld.sock" \
    --pid-file="$DB/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --log-error="$VAR/mariadb.log" </dev/null >/dev/null 2>&1 &
  echo $! >"$RUN/mariadbd.pid"
  wait_for "mariadb (see $VAR/mariadb.log)" 60 sql -e 'SELECT 1'
  log "started mariadbd ($(cat "$RUN/mariadbd.pid"))"
}

# The accounting database and its user; ALTER USER so a stale password never lingers.
setup_database() {
  sql --batch <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$ETC/dbpass")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
  [ "$DBD_CHANGED" = 0 ] || stop slurmdbd slurmdbd
  if alive slurmdbd slurmdbd; then return 0; fi
  setup_database
  slurmdbd </dev/null
  # slurmdbd writes its PID file before it reaches the database: wait for the port instead.
  wait_for "slurmdbd on port $DBD_PORT" 60 port_open "$DBD_PORT"
  log "started slurmdbd ($(cat "$RUN/slurmdbd.pid"))"
}

start_slurm_daemon() {
  local name=$1
  if alive "$name" "$name"; then return 0; fi
  "$name" </dev/null
  wait_for "$name" 30 alive "$name" "$name"
  log "started $name ($(cat "$RUN/$name.pid"))"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }

node_ready() {
  case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

# Wait for the node; a drained/down/inval state saved by an earlier run is resumed once.
wait_for_node() {
  local deadline=$((SECONDS + 60)) resumed=0 state
  until node_ready; do
    alive slurmctld slurmctld || die "slurmctld exited; its log ($LOG/slurmctld.log) ends: $(tail -n 3 "$LOG/slurmctld.log")"
    alive slurmd slurmd || die "slurmd exited; its log ($LOG/slurmd.log) ends: $(tail -n 3 "$LOG/slurmd.log")"
    state=$(node_state || true)
    case "$state" in
      drain* | down* | inval* | fail*)
        if [ $resumed = 0 ]; then
          scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
          resumed=1
        fi ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "node $NODE is '$state', not idle (logs: $LOG)"
    sleep 0.1
  done
}

cluster_registered() { [[ "$(sacctmgr -n -P show cluster format=cluster 2>/dev/null)" == *"$CLUSTER"* ]]; }

# The project's account, with the job user in it (accounting is recorded, not enforced).
ensure_account() {
  # One query answers the common case: cluster registered, account and association present.
  [ -z "$(sacctmgr -n -P show assoc where cluster="$CLUSTER" account="$ACCOUNT" user="$JOB_USER" \
    format=user 2>/dev/null)" ] || return 0
  wait_for "cluster $CLUSTER in slurmdbd" 60 cluster_registered
  if [ -z "$(sacctmgr -n -P show account where name="$ACCOUNT" format=account 2>/dev/null)" ]; then
    sacctmgr -i -Q add account "$ACCOUNT" Cluster="$CLUSTER" Description=curation Organization=curation >/dev/null
  fi
  if [ -z "$(sacctmgr -n -P show assoc where account="$ACCOUNT" user="$JOB_USER" format=user 2>/dev/null)" ]; then
    sacctmgr -i -Q add user "$JOB_USER" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
  fi
}

start_sshd() {
  [ "$SSH_CHANGED" = 0 ] || stop sshd sshd
  if alive sshd sshd; then return 0; fi
  install -d -m 0755 /run/sshd  # privilege separation directory; /run is tmpfs
  /usr/sbin/sshd -t -f "$SSHDIR/sshd_config" || die "sshd config rejected: $SSHDIR/sshd_config"
  /usr/sbin/sshd -f "$SSHDIR/sshd_config" -E "$LOG/sshd.log" </dev/null
  wait_for "sshd" 10 alive sshd sshd
  wait_for "sshd on port $SSH_PORT" 10 port_open "$SSH_PORT"
  log "started sshd ($(cat "$RUN/sshd.pid")) on 127.0.0.1:$SSH_PORT"
}

# Log in as dagster-slurm does (key only, batch mode, strict host key against our known_hosts), check
# that remote commands see our SLURM_CONF and reach the cluster, and copy a file with scp (SFTP). On
# failure: the reason, the client's -v lines and sshd's log, instead of opaque test failures later.
cmd_check() {
  local port key=$SSHDIR/id_ed25519 kh=$SSHDIR/known_hosts out probe
  port=$(configured_ssh_port)
  local opts=(-F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes
              -o UserKnownHostsFile="$kh" -o ConnectTimeout=10 -i "$key")
  if ! out=$(ssh "${opts[@]}" -v -p "$port" "$JOB_USER@127.0.0.1" \
      'test "$SLURM_CONF" = "'"$SLURM_CONF"'" && sinfo -h -o %P' 2>&1); then
    {
      echo "slurm.sh check: SSH login to $JOB_USER@127.0.0.1:$port with $key failed. The client said:"
      grep -v '^debug[23]' <<<"$out" | tail -n 15
      echo "sshd's log ($LOG/sshd.log), last lines:"
      tail -n 5 "$LOG/sshd.log" 2>/dev/null
      echo "Fix: 'scripts/slurm.sh down && scripts/slurm.sh up' rewrites keys and configs; if sshd refuses the"
      echo "key for 'bad ownership or modes', the folder it names must be root-owned and not group/world-writable."
    } >&2
    return 1
  fi
  [[ $out == *cpu* ]] || { log "check: logged in, but the remote sinfo did not list partition cpu: $out"; return 1; }
  probe=$(mktemp)
  if ! out=$(scp "${opts[@]}" -P "$port" -q "$probe" "$JOB_USER@127.0.0.1:$STATE/remote/.login-check" 2>&1); then
    rm -f "$probe"
    log "check: ssh works but scp (SFTP subsystem) failed: $out"
    return 1
  fi
  rm -f "$probe" "$STATE/remote/.login-check"
}

# One batch job with a step in it, end to end through accounting. The first job after slurmctld
# starts is slow (about 3 s): take that here, not in a test.
smoke_test() {
  local id state
  id=$(sbatch --parsable -p "$PARTITION" -t 1 -o /dev/null -e /dev/null --wrap 'srun -Q true') \
    || die "smoke test: sbatch failed (logs: $LOG)"
  wait_for "smoke test job $id" 60 bash -c "[ -z \"\$(squeue -h -j $id)\" ]"
  wait_for "smoke test job $id in sacct" 10 bash -c "[ -n \"\$(sacct -X -n -j $id -o State | tr -d ' ')\" ]"
  state=$(sacct -X -n -j "$id" -o State | tr -d ' ')
  [ "$state" = COMPLETED ] || die "smoke test job $id ended $state (logs: $LOG)"
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "run as root (the daemons, and the jobs, run as root)"
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool" "$STATE/remote"
  install -d -m 0700 "$SSHDIR"  # sshd's StrictModes wants keys in a private directory
  install_packages
  install_sys_dir
  choose_ports
  make_gpu_devices
  write_configs
  write_ssh_keys
  if [ "$SLURM_CHANGED" = 1 ] && { alive slurmctld slurmctld || alive slurmd slurmd; }; then
    log "slurm.conf changed: restarting slurmctld and slurmd"
    stop slurmd slurmd
    stop slurmctld slurmctld
  fi
  start_munge
  start_mariadb
  start_slurmdbd
  local cold=0
  alive slurmctld slurmctld || cold=1
  start_slurm_daemon slurmctld
  start_slurm_daemon slurmd
  wait_for_node
  ensure_account
  start_sshd
  if [ $cold = 1 ]; then smoke_test; fi
  cmd_check || die "the cluster runs, but logging in over SSH as the tests do failed (see above)"
  log "up: node $NODE $(node_state), ssh $JOB_USER@127.0.0.1:$SSH_PORT"
}

# Job processes that outlived slurmd: slurmstepds holding a socket in our spool dir, and every process
# whose environment names our SLURM_CONF and a SLURM_JOB_ID (scripts and their children).
kill_stray_job_processes() {
  local inodes pid fd strays=()
  inodes=" $(awk -v spool="$STATE/spool/" 'index($NF, spool) == 1 {printf "%s ", $7}' /proc/net/unix) "
  while read -r pid; do
    for fd in /proc/"$pid"/fd/*; do
      fd=$(readlink "$fd" 2>/dev/null) || continue
      if [[ $fd == socket:* && $inodes == *" ${fd//[^0-9]/} "* ]]; then strays+=("$pid"); break; fi
    done
  done < <(grep -lx slurmstepd /proc/[0-9]*/comm 2>/dev/null | cut -d/ -f3)
  while read -r pid; do
    [ "$pid" != $$ ] && grep -qz '^SLURM_JOB_ID=' "/proc/$pid/environ" 2>/dev/null && strays+=("$pid")
  done < <(grep -lzx "SLURM_CONF=$SLURM_CONF" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3)
  [ ${#strays[@]} -gt 0 ] || return 0
  log "killing stray job processes: ${strays[*]}"
  kill -KILL "${strays[@]}" 2>/dev/null || true
}

cmd_down() {
  if alive slurmctld slurmctld; then
    # Cancel jobs first, so none is requeued into the next up or leaves a slurmstepd behind.
    scancel --full --quiet --user="$JOB_USER" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  fi
  stop sshd sshd
  stop slurmd slurmd
  kill_stray_job_processes
  stop slurmctld slurmctld
  stop slurmdbd slurmdbd
  stop mariadbd mariadbd
  stop munged munged
}

# Everything `up` made for this clone: the state folder and the folders outside it.
cmd_purge() {
  cmd_down
  rm -rf "$SYS" "$VAR" "$STATE"
  log "purged $STATE, $SYS, $VAR"
}

cmd_status() {
  local ok=0 entry name comm
  for entry in munged:munged mariadbd:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld slurmd:slurmd sshd:sshd; do
    name=${entry%%:*} comm=${entry#*:}
    if alive "$name" "$comm"; then
      echo "$name: running ($(cat "$RUN/$name.pid"))"
    elif [ "$name" = munged ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
      echo "$name: running (not started by slurm.sh)"
    else
      echo "$name: stopped"
      ok=1
    fi
  done
  if [ $ok = 0 ]; then sinfo; fi
  return $ok
}

cmd_env() {
  local var value
  for var in HOST PORT USER KEY KNOWN_HOSTS PARTITION GPU_PARTITION ACCOUNT REMOTE_BASE ENV; do
    case $var in
      HOST) value=127.0.0.1 ;;
      PORT) value=$(configured_ssh_port) ;;
      USER) value=$JOB_USER ;;
      KEY) value=$SSHDIR/id_ed25519 ;;
      KNOWN_HOSTS) value=$SSHDIR/known_hosts ;;
      PARTITION) value=$PARTITION ;;
      GPU_PARTITION) value=$GPU_PARTITION ;;
      ACCOUNT) value=$ACCOUNT ;;
      REMOTE_BASE) value=$STATE/remote ;;
      ENV) value=$STATE/jobenv ;;  # the job environment scripts/slurm-env.sh builds
    esac
    printf 'export CURATION_SLURM_%s=%q\n' "$var" "$value"
  done
  printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
}

# up and down run one at a time (parallel test sessions may both call up). --close keeps the lock
# out of the daemons they start, which would otherwise hold it forever.
if [[ "${1:-}" == up || "${1:-}" == down || "${1:-}" == purge ]] && [ -z "${CURATION_SLURM_LOCKED:-}" ]; then
  mkdir -p "$STATE"
  CURATION_SLURM_LOCKED=1 exec flock --close -w 300 "$STATE/.lock" "$0" "$@"
fi

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  purge) cmd_purge ;;
  status) cmd_status ;;
  check) cmd_check ;;
  env) cmd_env ;;
  *) echo "usage: $0 up|down|purge|status|check|env" >&2; exit 2 ;;
esac
