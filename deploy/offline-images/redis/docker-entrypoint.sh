#!/bin/sh
# Entry point of event-replication-offline/redis (deploy/offline-images/redis/Dockerfile), as the
# official image's: options alone (or a .conf file) mean `redis-server` with them; as root, /data
# becomes the redis user's and the server runs as it; redis-server stays PID 1.
# Without a configuration file, `--protected-mode no --bind * -::*` come first, as the official
# image's defaults: the command's own options follow and win (Redis keeps the last value given).
set -e

if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi

if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
	find . \! -user redis -exec chown redis:redis '{}' +
	exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

if [ "$1" = 'redis-server' ]; then
	case "${2:-}" in
		'' | --*)
			shift
			set -- redis-server --protected-mode no --bind '*' '-::*' "$@"
			;;
	esac
	# Files the server writes (RDB, AOF) readable by its user only, as the official image.
	if [ "$(umask)" = '0022' ]; then
		umask 0077
	fi
fi

exec "$@"
