"""The person service: the only producer of entity-change events."""
