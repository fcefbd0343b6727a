"""The seed's naive design, complete, as a benchmark peer of the stack (bench/peer_bench.py).

Not product code: what the stack's guarantees are measured against, modelled on the write-ups
the project started from (/work/shared/seeds/, in Portuguese): a Flask API that writes its row
and publishes the event to RabbitMQ inside the request, and consumers that apply each event as
it comes.

- The API is `bench/post_apps.py`'s `naive()` (also measured alone as `post_naive_rps`): insert
  the row, publish the event (persistent, no publisher confirm) to a fanout exchange, commit. No
  outbox, no relay: a broker away loses the event or fails the request, a rolled-back write may
  be published.
- `consumers.py`: one process per read model, `basic.consume` with automatic acknowledgement
  (a consumer that dies loses what it was sent), each event applied as it arrives with no
  version gate (a late or repeated event overwrites a newer one): the score's person hash in
  Redis, the notifier's row in PostgreSQL, and the welcome e-mail posted straight from the
  notifier's consumer (no ledger: an e-mail that fails is gone, one that times out may go twice).

What it shares with the stack, so that the comparison is of the guarantees and nothing else:
the gateway (Traefik), the API's gunicorn settings, the broker's quorum queues, the servers,
and the e-mail itself: composed by the notifier's `Composer` (the same templates and signed
link) and posted by its `SendGridTransport` (one TLS context, kept-alive connections) from as
many threads as the stack's sender runs (SENDER_CONCURRENCY, 8), to the same fake SendGrid.
"""
