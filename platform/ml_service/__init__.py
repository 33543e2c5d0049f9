"""ml_service."""
