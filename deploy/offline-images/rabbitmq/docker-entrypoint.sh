#!/usr/bin/env bash
# Entry point of event-replication-offline/rabbitmq (deploy/offline-images/rabbitmq/Dockerfile).
#   - options alone mean `rabbitmq-server` with them;
#   - as root: the data and log directories become the rabbitmq user's, then this runs again as it;
#   - RABBITMQ_ERLANG_COOKIE, when given, is written to $HOME/.erlang.cookie (mode 600); without it
#     a cookie is made once, before the server starts, so that a command-line tool run meanwhile
#     (a healthcheck as root) never makes one the server could not read;
#   - exec rabbitmq-server: it stays PID 1 and stops the node cleanly on SIGTERM (docker stop).
# RABBITMQ_DEFAULT_USER/_PASS/_VHOST and RABBITMQ_NODE_PORT are read by RabbitMQ itself, and so is
# /etc/rabbitmq/conf.d/*.conf.
set -euo pipefail

if [ "${1:0:1}" = '-' ]; then
	set -- rabbitmq-server "$@"
fi

if [ "${1:-}" = 'rabbitmq-server' ] && [ "$(id -u)" = '0' ]; then
	mkdir -p "$RABBITMQ_DATA_DIR" /var/log/rabbitmq
	find "$RABBITMQ_DATA_DIR" /var/log/rabbitmq \! -user rabbitmq -exec chown rabbitmq:rabbitmq '{}' +
	exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ "${1:-}" = 'rabbitmq-server' ]; then
	cookie="$HOME/.erlang.cookie"
	if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
		if [ -s "$cookie" ] && [ "$(cat "$cookie")" != "$RABBITMQ_ERLANG_COOKIE" ]; then
			echo >&2 "warning: $cookie differs from RABBITMQ_ERLANG_COOKIE; writing RABBITMQ_ERLANG_COOKIE to it"
		fi
		rm -f "$cookie"
		(umask 077 && printf '%s' "$RABBITMQ_ERLANG_COOKIE" >"$cookie")
		chmod 600 "$cookie"
		unset RABBITMQ_ERLANG_COOKIE  # the file says it; RabbitMQ 3.10 warns about the variable
	elif [ ! -s "$cookie" ]; then
		value="$(LC_ALL=C tr -dc 'A-Z' </dev/urandom | head -c 20 || true)"
		rm -f "$cookie"
		(umask 077 && printf '%s' "$value" >"$cookie")
		chmod 400 "$cookie"
	fi
	set -- /usr/lib/rabbitmq/bin/rabbitmq-server "${@:2}"
fi

exec "$@"
