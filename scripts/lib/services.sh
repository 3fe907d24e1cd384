# Private PostgreSQL and Redis servers for one script run (sourced, not run).
#
# Nothing is assumed to run on the machine: `start_test_services` starts a PostgreSQL cluster
# of its own (initdb + pg_ctl in a temporary directory, as a non-root user, on a free port)
# and a Redis server of its own, exports where they are, and arranges for both to be stopped
# and their directory removed when the calling script exits, however it exits:
#   SYNAPSE_TEST_POSTGRES_DSN  postgresql://postgres@127.0.0.1:PORT/synapse_test
#   SYNAPSE_TEST_REDIS_URL     redis://127.0.0.1:PORT/0
# and SYNAPSE_REQUIRE_POSTGRES=1 / SYNAPSE_REQUIRE_REDIS=1, so a test that needs one fails
# instead of skipping.
# The server packages come from Debian (`ensure_debian_packages`, as root); without them and
# without root, the variables stay unset and those tests skip, saying why.

SERVICES_DIR=""
SERVICES_PIDS=()

# A port nobody listens on now (the kernel picks it; the tiny window before the server binds
# it is why each server's start is checked).
free_port() {
    "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The PostgreSQL server binaries of the newest installed major version (Debian keeps them off
# PATH, under /usr/lib/postgresql/N/bin).
postgres_bindir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

# Runs a command as the user the servers run as: PostgreSQL refuses to run as root, so as
# root that is Debian's `postgres` user (created by the package); otherwise the caller.
as_service_user() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

stop_test_services() {
    local code=$?
    [ -n "$SERVICES_DIR" ] || return "$code"
    if [ -f "$SERVICES_DIR/pg/postmaster.pid" ]; then
        as_service_user "$(postgres_bindir)/pg_ctl" -D "$SERVICES_DIR/pg" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    local pid
    for pid in "${SERVICES_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${SERVICES_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
    rm -rf "$SERVICES_DIR"
    SERVICES_DIR=""
    return "$code"
}

start_postgres() {
    local bindir port dir="$SERVICES_DIR/pg"
    bindir=$(postgres_bindir) || { echo "== PostgreSQL is not installed: its tests will skip"; return 0; }
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        echo "error: PostgreSQL is installed but its 'postgres' user is missing; reinstall postgresql" >&2
        exit 1
    fi
    port=$(free_port)
    as_service_user "$bindir/initdb" -D "$dir" -U postgres -A trust --no-sync -E UTF8 >"$SERVICES_DIR/pg-initdb.log" 2>&1 || {
        cat "$SERVICES_DIR/pg-initdb.log" >&2
        echo "error: initdb failed (see above)" >&2
        exit 1
    }
    # fsync off: a test server's data is thrown away at the end; the suite tests Synapse's
    # durability, not PostgreSQL's.
    as_service_user "$bindir/pg_ctl" -D "$dir" -l "$SERVICES_DIR/pg.log" -w -t 60 \
        -o "-p $port -k $SERVICES_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null || {
        cat "$SERVICES_DIR/pg.log" >&2
        echo "error: the test PostgreSQL server did not start on port $port (see its log above)" >&2
        exit 1
    }
    as_service_user "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres synapse_test
    export SYNAPSE_TEST_POSTGRES_DSN="postgresql://postgres@127.0.0.1:$port/synapse_test"
    export SYNAPSE_REQUIRE_POSTGRES=1
    echo "== PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (for this run)"
}

start_redis() {
    command -v redis-server >/dev/null 2>&1 || { echo "== Redis is not installed: its tests will skip"; return 0; }
    local port
    port=$(free_port)
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$SERVICES_DIR" \
        --logfile "$SERVICES_DIR/redis.log" --daemonize no >/dev/null 2>&1 &
    SERVICES_PIDS+=($!)
    local i
    for i in $(seq 1 100); do
        if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
            export SYNAPSE_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
            export SYNAPSE_REQUIRE_REDIS=1
            echo "== Redis $(redis-server --version | awk '{print $3}' | cut -d= -f2) on 127.0.0.1:$port (for this run)"
            return 0
        fi
        kill -0 "${SERVICES_PIDS[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    cat "$SERVICES_DIR/redis.log" >&2 2>/dev/null
    echo "error: the test Redis server did not start on port $port (see its log above)" >&2
    exit 1
}

start_test_services() {
    SERVICES_DIR=$(mktemp -d /tmp/synapse-services.XXXXXX)
    chmod 0755 "$SERVICES_DIR"
    [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && chown postgres "$SERVICES_DIR"
    trap stop_test_services EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    start_postgres
    start_redis
}

# Debian's server packages may enable and start system-wide instances (units on 5432 and
# 6379); the scripts run their own, so those are stopped and disabled where systemd runs.
disable_system_services() {
    [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 || return 0
    systemctl disable --now postgresql redis-server >/dev/null 2>&1 || true
}
