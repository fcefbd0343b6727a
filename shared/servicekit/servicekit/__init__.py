"""The HTTP and process glue the services share: web conventions (errors, JSON bodies, OpenAPI,
the standard routes), API keys, settings, serving, logs, tracing, process running, metrics and
migrations. It knows nothing of messaging."""
