#!/bin/sh
# Entry point of event-replication-offline/traefik (deploy/offline-images/traefik/Dockerfile), as
# the official image's: options alone (`--ping=true ...`) mean `traefik` with them, and a Traefik
# subcommand (`healthcheck --ping`, `version`) runs through traefik; anything else runs as given.
set -e

# first arg is `-f` or `--some-option`
if [ "${1#-}" != "$1" ]; then
	set -- traefik "$@"
fi

# a Traefik subcommand: run it through traefik
if [ "$1" != 'traefik' ] && traefik "$1" --help >/dev/null 2>&1; then
	set -- traefik "$@"
fi

exec "$@"
