"""The score service: a disposable Redis read model rebuilt from the person service's events."""
