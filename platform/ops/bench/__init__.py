"""``mlp bench``: the end-to-end benchmark, its baselines, load generator, spawned platform and statistics."""
