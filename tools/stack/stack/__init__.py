"""The development stack: make up and down (`up`), the Procfile's processes one by one
(`processes`), a three-node RabbitMQ cluster of its own (`cluster`), the compose secrets
(`compose_env`), stand-in images for an engine with no registry (`images_offline`), and the check
that the servers answer (`check_servers`)."""

from pathlib import Path

# The project's checkout (Procfile, traefik/, docker-compose.yml): this package is installed from
# it, editable (make install), at tools/stack/stack.
ROOT = Path(__file__).resolve().parents[3]
