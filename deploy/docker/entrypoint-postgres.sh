#!/bin/sh
# PostgreSQL for docker mode: makes the cluster in its volume the first time (superuser
# `synapse`, password from the Compose secret, database `synapse`; the nodes each use their
# own schema in it), then runs the server in the foreground as `postgres`.
set -eu
PGDATA=/var/lib/postgresql/data
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PASSWORD_FILE=${POSTGRES_PASSWORD_FILE:-/run/secrets/postgres_password}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    pw=$(mktemp)
    cat "$PASSWORD_FILE" >"$pw"
    chown postgres "$pw"
    runuser -u postgres -- "$BIN/initdb" -D "$PGDATA" -U synapse --pwfile="$pw" -E UTF8 \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    rm -f "$pw"
    # Password logins from the stack's network only (the port is not published).
    echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE synapse OWNER synapse;" | runuser -u postgres -- "$BIN/postgres" --single -D "$PGDATA" postgres >/dev/null
    echo "postgres: initialized $PGDATA" >&2
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c max_connections=100
