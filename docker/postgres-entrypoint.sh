#!/bin/sh
# PostgreSQL for the study: initialises $PGDATA on first start (trust authentication: the
# database is only reachable on the system's private network), creates database `study`, then
# runs postgres in the foreground with max_connections=$MAX_CONNECTIONS (100: async-limited,
# 1000: async-unlimited) and any extra arguments (e.g. -c shared_buffers=256MB).
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE study" | postgres --single -D "$PGDATA" postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c max_connections="${MAX_CONNECTIONS:-100}" "$@"
