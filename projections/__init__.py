"""Projections: pure projectors (event -> writes), their Postgres/Redis adapters, migrations, replay."""
