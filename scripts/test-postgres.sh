# shellcheck shell=bash
# Sourced by scripts/test.sh: makes sure a PostgreSQL server is there for the tests and exports
# TUTELA_TEST_POSTGRES_URL. Kept as is if the variable is already set (your own server).
# Otherwise a throwaway cluster under ${TMPDIR:-/tmp}/tutela-test-pg on port 55432 (fsync off: it
# holds test data only), installed with apt-get when PostgreSQL is missing, started if it is not
# running, reused on the next run.
if [ -z "${TUTELA_TEST_POSTGRES_URL:-}" ]; then
    pg_port=55432
    pg_dir="${TMPDIR:-/tmp}/tutela-test-pg"
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$pg_bin" ]; then
        echo "==> installing PostgreSQL (apt-get)" >&2
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        else
            sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        fi
        pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    # initdb refuses to run as root: run the cluster as the postgres user then.
    if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); else as_pg=(); fi
    if [ ! -f "$pg_dir/PG_VERSION" ]; then
        echo "==> creating a throwaway PostgreSQL cluster in $pg_dir" >&2
        rm -rf "$pg_dir" && mkdir -p "$pg_dir"
        [ "$(id -u)" = 0 ] && chown postgres "$pg_dir"
        "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir" -A trust -U postgres >/dev/null
    fi
    if ! "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir" status >/dev/null 2>&1; then
        "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir" -w -l "$pg_dir/server.log" \
            -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
            start >/dev/null
    fi
    export TUTELA_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
fi
