"""The webhook dispatcher (``mlp dispatcher``): outcome events in, signed deliveries out (docs/operations.md)."""
