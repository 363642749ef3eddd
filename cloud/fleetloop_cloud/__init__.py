"""The coordinator: ingest, metadata, fleet store, query, artifacts, rollouts, gRPC and HTTP surfaces."""

__version__ = "0.1.0"
