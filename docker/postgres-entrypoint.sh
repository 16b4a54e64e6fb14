#!/bin/sh
# PostgreSQL for the study, authenticating as the study's official postgres image does: on first
# start it initialises $PGDATA with the superuser `postgres` and password $POSTGRES_PASSWORD
# (stored as a SCRAM-SHA-256 verifier), connections over the loopback and the local socket are
# trusted (the image's initdb defaults: psql inside the container), and every other host must
# authenticate with $POSTGRES_HOST_AUTH_METHOD (default scram-sha-256, the image's default since
# PostgreSQL 14; `trust` is the control without authentication). It creates database `study`,
# then runs postgres in the foreground with max_connections=$MAX_CONNECTIONS (100: sync and
# async-limited, 1000: async-unlimited) and any extra arguments (e.g. -c shared_buffers=256MB).
# Authentication is chosen when the data directory is made; later starts keep it.
# Given neither variable it refuses to start, as the official image does.
set -e
auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ "$auth" != trust ] && [ -z "$POSTGRES_PASSWORD" ]; then
        echo "POSTGRES_PASSWORD is empty: set it, or POSTGRES_HOST_AUTH_METHOD=trust" >&2
        exit 1
    fi
    initdb -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    echo "host all all all $auth" >> "$PGDATA/pg_hba.conf"
    # Single-user mode reads one statement per line; the password is quoted as an SQL literal.
    pw=$(printf '%s' "$POSTGRES_PASSWORD" | sed "s/'/''/g")
    printf "CREATE DATABASE study\nALTER ROLE postgres PASSWORD '%s'\n" "$pw" \
        | postgres --single -D "$PGDATA" -c password_encryption=scram-sha-256 postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c password_encryption=scram-sha-256 \
    -c max_connections="${MAX_CONNECTIONS:-100}" "$@"
