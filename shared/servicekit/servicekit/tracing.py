"""Traces through the outbox (OpenTelemetry).

The trace context of the request is captured when its outbox row is written (not when the relay
publishes: a batch of rows belongs to many requests), stored with the row, carried in the
message's headers (`traceparent`, `tracestate`) and continued by each consumer's apply and by
the e-mail's send. Flask, psycopg and Redis get their spans from the opentelemetry-instrumentation
packages; pika's instrumentation wraps only blocking channels and would re-inject a context of
its own into a retried message's headers, so AMQP propagation is done here, by hand.

Exporting is off unless OTEL_EXPORTER_OTLP_ENDPOINT is set (the OTLP/HTTP exporter then reads the
standard OTEL_* variables); without it no tracer provider is installed and every call here is a
cheap no-op.

What a request may bring in: a server span is the start of a new trace unless the request came
with a valid API key (access.py), whose client's `traceparent` it continues; another client's is
only linked. `baggage` is never taken, and only `traceparent`/`tracestate` are carried onwards.
No span holds a query string (an activation link's token is one), as no access log line does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_INSTRUMENTED: set[str] = set()
# The trace context that crosses the pipeline (outbox rows, message headers): W3C traceparent and
# tracestate, never baggage, whatever propagators the environment names.
_PROPAGATOR = TraceContextTextMapPropagator()
_CLIENT_CONTEXT = "servicekit.tracing.client_context"  # a client's context, set aside (environ)


def configure(service_name: str) -> bool:
    """Install the OTLP exporter if OTEL_EXPORTER_OTLP_ENDPOINT is set; True if tracing is on."""
    if not enabled() and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    if enabled():
        instrument_libraries()
    return enabled()


def enabled() -> bool:
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def instrument_libraries() -> None:
    """psycopg's and Redis's spans (once per process)."""
    if "libraries" in _INSTRUMENTED:
        return
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    PsycopgInstrumentor().instrument(skip_dep_check=True)
    RedisInstrumentor().instrument()
    _INSTRUMENTED.add("libraries")


def uninstrument_libraries() -> None:
    if "libraries" not in _INSTRUMENTED:
        return
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    PsycopgInstrumentor().uninstrument()
    RedisInstrumentor().uninstrument()
    _INSTRUMENTED.discard("libraries")


def init_app(app: Any, service_name: str) -> None:
    """Trace the app's requests when tracing is configured (OTEL_EXPORTER_OTLP_ENDPOINT)."""
    if configure(service_name):
        instrument_flask(app)


def instrument_flask(app: Any) -> None:
    """Server spans for the app's requests; call after access.init_app (they take the client's
    trace context only from a request with a valid key)."""
    if enabled():
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        # Before the instrumentation's own hook, which starts the span from the environ.
        app.before_request(_at_the_edge)
        FlaskInstrumentor().instrument_app(app, request_hook=_link_the_client_context)


def _at_the_edge() -> None:
    """Leave in the environ only what the request's span may take."""
    from flask import g, request  # the web extra's: the event pipeline imports this module too

    environ = request.environ
    environ.pop("HTTP_BAGGAGE", None)
    if "principal" not in g:  # no valid key (an open route, or keys off): a trace of our own
        environ[_CLIENT_CONTEXT] = {
            name.removeprefix("HTTP_").lower(): environ.pop(name)
            for name in ("HTTP_TRACEPARENT", "HTTP_TRACESTATE")
            if name in environ
        }
    # The request object holds its own copy of the query, which the route reads; the span, built
    # from the environ, gets the path alone (as the access log does).
    environ["QUERY_STRING"] = ""
    for name in ("RAW_URI", "REQUEST_URI"):
        if name in environ:
            environ[name] = environ[name].partition("?")[0]


def _link_the_client_context(span: Span, environ: dict[str, Any]) -> None:
    """A client's trace that was not continued is linked: findable, never a parent."""
    client = extracted(environ.get(_CLIENT_CONTEXT))
    if client is not None and span.is_recording():
        span.add_link(trace.get_current_span(client).get_span_context())


def tracer() -> trace.Tracer:
    return trace.get_tracer("messaging")


def captured() -> str | None:
    """The current trace context as JSON text (what an outbox row keeps), or None."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return json.dumps(carrier) if carrier else None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def extracted(carrier: Mapping[str, Any] | str | None) -> otel_context.Context | None:
    """The context a carrier holds: message headers, or an outbox row's JSON text."""
    if not carrier or not enabled():
        return None
    if isinstance(carrier, str):
        try:
            carrier = json.loads(carrier)
        except ValueError:
            return None
    if not isinstance(carrier, Mapping):
        return None
    found = _PROPAGATOR.extract({k: _text(v) for k, v in carrier.items() if isinstance(k, str)})
    return found if trace.get_current_span(found).get_span_context().is_valid else None


def headers_for(stored: str | None, exchange: str) -> dict[str, str] | None:
    """The headers a published event carries: a `publish` span, child of the request's."""
    parent = extracted(stored)
    if parent is None:
        return None
    carrier: dict[str, str] = {}
    with tracer().start_as_current_span(
        f"publish {exchange}", context=parent, kind=SpanKind.PRODUCER
    ):
        _PROPAGATOR.inject(carrier)
    return carrier


@contextmanager
def continued(name: str, carriers: list[Any], kind: SpanKind = SpanKind.CONSUMER) -> Iterator[None]:
    """A span that continues the first carrier's trace and links the others' (a batch)."""
    if not enabled():
        yield
        return
    contexts = [c for c in (extracted(carrier) for carrier in carriers) if c is not None]
    parent = contexts[0] if contexts else None
    links = [Link(trace.get_current_span(c).get_span_context()) for c in contexts[1:128]]
    with tracer().start_as_current_span(name, context=parent, kind=kind, links=links):
        yield


def record(name: str, carrier: Any, start_ns: int, kind: SpanKind = SpanKind.CLIENT) -> None:
    """A span that began at `start_ns` and ends now, in the carrier's trace: work done for a
    batch, whose members' traces are known only once it is done."""
    if not enabled():
        return
    span = tracer().start_span(name, context=extracted(carrier), kind=kind, start_time=start_ns)
    span.end()
