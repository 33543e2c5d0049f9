"""results_collector."""
