#!/usr/bin/env bash
# Entry point of event-replication-offline/postgres (deploy/offline-images/postgres/Dockerfile):
# the official image's contract on Debian's PostgreSQL.
#   - as root: make PGDATA and the socket directory the postgres user's, then run again as it;
#   - PGDATA without PG_VERSION: initdb (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_INITDB_ARGS),
#     listen on every address, host connections authenticated by POSTGRES_HOST_AUTH_METHOD
#     (scram-sha-256 by default), create POSTGRES_DB, run /docker-entrypoint-initdb.d/*;
#   - then exec postgres, which stays PID 1 (docker stop: SIGINT, a fast shutdown).
set -Eeo pipefail

# VAR from the environment or from the file named by VAR_FILE (Docker secrets), not both.
file_env() {
	local var="$1" file_var="${1}_FILE" val="${2:-}"
	if [ "${!var:-}" ] && [ "${!file_var:-}" ]; then
		echo >&2 "error: both $var and $file_var are set (but are exclusive)"
		exit 1
	fi
	if [ "${!var:-}" ]; then
		val="${!var}"
	elif [ "${!file_var:-}" ]; then
		val="$(<"${!file_var}")"
	fi
	export "$var"="$val"
	unset "$file_var"
}

# `postgres --help`, `--version`, `-C name` and friends print and exit: no initialisation for them.
wants_help() {
	local arg
	for arg; do
		case "$arg" in
			-'?' | --help | --describe-config | -V | --version | -C | --check) return 0 ;;
		esac
	done
	return 1
}

setup_env() {
	file_env POSTGRES_PASSWORD
	file_env POSTGRES_USER postgres
	file_env POSTGRES_DB "$POSTGRES_USER"
	file_env POSTGRES_INITDB_ARGS
	: "${POSTGRES_HOST_AUTH_METHOD:=}"
	export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
}

as_root_prepare() {
	mkdir -p "$PGDATA" /var/run/postgresql
	# A volume made elsewhere may hold files of another uid: the postgres user owns them all.
	find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
	chmod 700 "$PGDATA"
	chown postgres:postgres /var/run/postgresql
	chmod 3777 /var/run/postgresql
}

verify_minimum_env() {
	if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != 'trust' ]; then
		cat >&2 <<-'EOM'
			Error: Database is uninitialized and superuser password is not specified.
			       You must specify POSTGRES_PASSWORD to a non-empty value for the
			       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".

			       You may also use "POSTGRES_HOST_AUTH_METHOD=trust" to allow all
			       connections without a password. This is *not* recommended.
		EOM
		exit 1
	fi
	if [ "$POSTGRES_HOST_AUTH_METHOD" = 'trust' ]; then
		echo >&2 'warning: POSTGRES_HOST_AUTH_METHOD=trust: every host connection is allowed without a password.'
	fi
}

init_database_dir() {
	local auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
	local args=(--username="$POSTGRES_USER" --auth-local=trust --auth-host="$auth")
	# shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of arguments, as in the official image
	if [ -n "$POSTGRES_PASSWORD" ]; then
		initdb "${args[@]}" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") $POSTGRES_INITDB_ARGS
	else
		initdb "${args[@]}" $POSTGRES_INITDB_ARGS
	fi
	{
		echo
		echo "# event-replication-offline: every address, as the official image"
		echo "listen_addresses = '*'"
	} >>"$PGDATA/postgresql.conf"
	{
		echo
		echo "# event-replication-offline: connections from any host, as the official image"
		echo "host all all all $auth"
	} >>"$PGDATA/pg_hba.conf"
}

psql_init() {
	psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc "$@"
}

create_database() {
	if [ "$POSTGRES_DB" = 'postgres' ]; then
		return
	fi
	local exists
	exists="$(psql_init --dbname postgres --set db="$POSTGRES_DB" --tuples-only <<-'EOSQL'
		SELECT 1 FROM pg_database WHERE datname = :'db' ;
	EOSQL
	)"
	if [ -z "${exists// /}" ]; then
		psql_init --dbname postgres --set db="$POSTGRES_DB" <<-'EOSQL'
			CREATE DATABASE :"db" ;
		EOSQL
		echo
	fi
}

run_init_scripts() {
	local f
	for f in /docker-entrypoint-initdb.d/*; do
		case "$f" in
			*.sh)
				if [ -x "$f" ]; then
					echo "$0: running $f"
					"$f"
				else
					echo "$0: sourcing $f"
					# shellcheck disable=SC1090
					. "$f"
				fi
				;;
			*.sql) echo "$0: running $f"; psql_init --dbname "$POSTGRES_DB" -f "$f"; echo ;;
			*.sql.gz) echo "$0: running $f"; gunzip -c "$f" | psql_init --dbname "$POSTGRES_DB"; echo ;;
			*.sql.xz) echo "$0: running $f"; xzcat "$f" | psql_init --dbname "$POSTGRES_DB"; echo ;;
			*/\*) ;;  # the directory is empty
			*) echo "$0: ignoring $f" ;;
		esac
	done
}

initialise() {
	verify_minimum_env
	init_database_dir
	# A server on the socket only, for the database and the init scripts.
	export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
	pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p ${PGPORT:-5432}" -w start
	create_database
	run_init_scripts
	pg_ctl -D "$PGDATA" -m fast -w stop
	unset PGPASSWORD
	echo
	echo 'PostgreSQL init process complete; ready for start up.'
	echo
}

if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi

if [ "$1" = 'postgres' ] && ! wants_help "$@"; then
	setup_env
	if [ "$(id -u)" = '0' ]; then
		as_root_prepare
		exec setpriv --reuid=postgres --regid=postgres --init-groups \
			env HOME=/var/lib/postgresql "${BASH_SOURCE[0]}" "$@"
	fi
	if [ ! -s "$PGDATA/PG_VERSION" ]; then
		initialise
	else
		echo
		echo 'PostgreSQL Database directory appears to contain a database; Skipping initialization'
		echo
	fi
fi

exec "$@"
