"""Many replicas under Ray Serve (`mistralrs-serve ray`): an ingress that routes
each request by prefix affinity to an engine replica running the very app a
single server runs, with the shared state in PostgreSQL and a blob store.

- `app.py`: the Serve application (deployments, autoscaling, the router) and
  the `ray` command; `build` is the import path for `serve run`/`serve deploy`.
- `ingress.py`: the HTTP ingress: routing keys, streaming pass-through,
  retries when a replica dies, and `/health` and `/metrics` over every replica.
- `affinity.py`: what a request's routing key is, and which replica a key goes to.
- `router.py`: the Ray Serve request router that applies affinity, falling back
  to the least-loaded replica.
- `replica.py`: one engine replica: the single server's FastAPI app on its own
  port; a Ray call reserves it for a request, whose bytes then go over HTTP.
"""
