"""ml_worker."""
