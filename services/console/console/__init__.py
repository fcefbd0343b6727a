"""The operators' console: a service of its own, reading only what the others expose."""
