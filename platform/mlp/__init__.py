"""Shared plumbing of the platform's services: settings, telemetry, bus/db/redis factories, the `mlp` CLI."""
