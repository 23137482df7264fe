#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: scripts/postgres.sh start|stop|status|url
#
#   start   initdb (once) + start on 127.0.0.1:$AUTOSPARSE_PG_PORT (default 55432), trust auth,
#           unix socket in the cluster dir; create database autosparse_test; print its URL.
#           Already running: just print the URL.
#   stop    stop the server and remove its directory (nothing to stop: fine).
#   status  exit 0 when the server is running.
#   url     print the SQLAlchemy URL.
#
# The cluster lives in $AUTOSPARSE_PG_DIR (default /tmp/autosparse-pg-<port>). initdb refuses to
# run as root: as root the server runs as the `postgres` system user (created if missing).
# Binaries are taken from $AUTOSPARSE_PG_BINDIR if set, else PATH or /usr/lib/postgresql/*/bin
# (newest version first); when none are found, root with AUTOSPARSE_INSTALL_POSTGRES=1 installs
# Debian's `postgresql` package (without the "main" cluster it would otherwise create and start).
# Only the URL goes to stdout; errors go to stderr (exit 3: no server binaries available).
set -euo pipefail

PORT=${AUTOSPARSE_PG_PORT:-55432}
DIR=${AUTOSPARSE_PG_DIR:-/tmp/autosparse-pg-$PORT}
DB=autosparse_test
URL="postgresql://postgres@127.0.0.1:$PORT/$DB"  # the README form: SQLAlchemy picks psycopg 3
DATA=$DIR/data
LOG=$DIR/server.log
MARKER=$DIR/.autosparse-pg   # only a directory carrying this marker is ever removed

die() { echo "scripts/postgres.sh: $*" >&2; exit "${EXIT_CODE:-1}"; }

find_bindir() {
  local candidates=() dir
  if [ -n "${AUTOSPARSE_PG_BINDIR:-}" ]; then
    candidates=("$AUTOSPARSE_PG_BINDIR")   # this directory only
  elif command -v initdb >/dev/null 2>&1; then
    candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
  fi
  if [ -z "${AUTOSPARSE_PG_BINDIR:-}" ] && compgen -G "/usr/lib/postgresql/*/bin" >/dev/null; then
    while IFS= read -r dir; do candidates+=("$dir"); done \
      < <(ls -d /usr/lib/postgresql/*/bin | sort -t/ -k5 -V -r)
  fi
  for dir in "${candidates[@]}"; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] \
       && [ -x "$dir/pg_isready" ] && [ -x "$dir/psql" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

install_postgres() {
  # Debian/Ubuntu: the package would create and start a "main" cluster on 5432; we don't want it
  # (createcluster.conf includes createcluster.d/, which its postinst reads via pg_conftool).
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/autosparse-no-main.conf
  echo "scripts/postgres.sh: installing PostgreSQL (apt-get install postgresql)" >&2
  local log
  log=$(mktemp /tmp/autosparse-apt-XXXXXX.log)
  if apt-get update -qq >"$log" 2>&1 \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
        >>"$log" 2>&1; then
    rm -f "$log"
  else
    tail -n 20 "$log" >&2
    rm -f "$log"
    return 1
  fi
}

BINDIR=""
need_bindir() {
  if BINDIR=$(find_bindir); then return 0; fi
  if [ "$(id -u)" = 0 ] && [ "${AUTOSPARSE_INSTALL_POSTGRES:-0}" = 1 ] && command -v apt-get >/dev/null; then
    install_postgres || EXIT_CODE=3 die "installing PostgreSQL with apt-get failed"
    BINDIR=$(find_bindir) || EXIT_CODE=3 die "PostgreSQL installed, but no initdb/pg_ctl found"
    return 0
  fi
  EXIT_CODE=3 die "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in PATH or /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql) or run as root with AUTOSPARSE_INSTALL_POSTGRES=1"
}

# Run a server-side command as the cluster's owner: the `postgres` user when we are root.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    (cd "$DIR" && runuser -u postgres -- "$@")
  else
    (cd "$DIR" && "$@")
  fi
}

ensure_owner_user() {
  [ "$(id -u)" = 0 ] || return 0
  id postgres >/dev/null 2>&1 && return 0
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres \
    || die "could not create the postgres system user"
}

running() {
  [ -f "$DATA/PG_VERSION" ] || return 1
  [ -n "$BINDIR" ] || BINDIR=$(find_bindir) || return 1
  as_owner "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

client() {  # psql as the superuser over TCP (trust auth)
  "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"
}

ensure_database() {
  local exists
  exists=$(client -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'") \
    || die "cannot connect to the server on 127.0.0.1:$PORT"
  if [ "$exists" != 1 ]; then
    client -d postgres -c "CREATE DATABASE $DB" >/dev/null 2>&1 \
      || [ "$(client -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" = 1 ] \
      || die "could not create database $DB"
  fi
}

start() {
  need_bindir
  if [ -e "$DIR" ] && [ ! -f "$MARKER" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    die "$DIR exists and is not a cluster made by this script; set AUTOSPARSE_PG_DIR elsewhere"
  fi
  ensure_owner_user
  if ! running; then
    mkdir -p "$DIR"
    touch "$MARKER"
    if [ "$(id -u)" = 0 ]; then chown -R postgres: "$DIR"; fi
    chmod 700 "$DIR"
    if [ ! -f "$DATA/PG_VERSION" ]; then
      rm -rf "$DATA"
      as_owner "$BINDIR/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --no-locale --no-sync \
        >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
      cat >>"$DATA/postgresql.conf" <<EOF

# scripts/postgres.sh: a throwaway test server, local only
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
    fi
    if ! as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -s start >/dev/null 2>&1; then
      tail -n 20 "$LOG" >&2 2>/dev/null || true
      die "the server did not start on 127.0.0.1:$PORT (port taken?); log: $LOG"
    fi
  fi
  local waited=0
  until "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2; do
    waited=$((waited + 1))
    [ "$waited" -lt 60 ] || die "the server on 127.0.0.1:$PORT is not ready after 60 s; log: $LOG"
    sleep 1
  done
  ensure_database
  echo "$URL"
}

stop() {
  [ -e "$DIR" ] || return 0
  if [ -z "$(ls -A "$DIR" 2>/dev/null)" ]; then rmdir "$DIR"; return 0; fi
  [ -f "$MARKER" ] || die "$DIR is not a cluster made by this script; not touching it"
  if [ -f "$DATA/postmaster.pid" ]; then
    BINDIR=$(find_bindir) || true
    if [ -z "$BINDIR" ] || ! as_owner "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t 60 -s stop >/dev/null 2>&1; then
      # pg_ctl gone or failed: end the postmaster of this cluster (first line of postmaster.pid)
      local pid
      pid=$(head -n 1 "$DATA/postmaster.pid" 2>/dev/null || true)
      if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
  fi
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) running ;;
  url) echo "$URL" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
