"""The HTTP service: FastAPI app, routes, batching, metrics, video jobs (docs/operations.md)."""
