"""The HTTP and process glue the services share: web (flask-openapi3 apps whose routes make their
OpenAPI document, strict JSON bodies), one init_app per concern (correlation ids, access by API
key, errors, metrics, health and readiness, docs), API keys, settings, serving, logs, tracing,
process running and migrations. It knows nothing of messaging."""
