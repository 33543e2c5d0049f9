"""Secrets as files: MLP_SECRETS_DIR (a mounted Kubernetes Secret) supplies what the environment does not."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from mlp.settings import Settings


def _kubernetes_secret_volume(root: Path, values: dict[str, str]) -> Path:
    """The layout the kubelet writes: the files in a timestamped folder, reached through ``..data`` links."""
    data = root / "..2025_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    (root / "..data").symlink_to(data.name)
    for name, value in values.items():
        (data / name).write_text(value, encoding="utf-8")
        (root / name).symlink_to(f"..data/{name}")
    return root


def test_secret_files_fill_the_settings_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = _kubernetes_secret_volume(
        tmp_path / "secrets",
        {
            "MLP_POSTGRES_DSN": "postgresql://mlp_collector_app:s3cret-collector@db:5432/mlp\n",
            "MLP_REDIS_URL": "redis://:from-file@redis:6379/0",
        },
    )
    monkeypatch.setenv("MLP_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("MLP_REDIS_URL", "redis://:from-env@redis:6379/0")
    monkeypatch.delenv("MLP_POSTGRES_DSN", raising=False)

    settings = Settings(environment="production")
    assert settings.postgres_dsn == "postgresql://mlp_collector_app:s3cret-collector@db:5432/mlp"
    assert settings.redis_url == "redis://:from-env@redis:6379/0"


def test_a_placeholder_in_a_secret_file_is_refused_in_production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = _kubernetes_secret_volume(
        tmp_path / "secrets", {"MLP_POSTGRES_DSN": "postgresql://mlp_gateway_app:changeme@db:5432/mlp"}
    )
    monkeypatch.setenv("MLP_SECRETS_DIR", str(secrets))
    monkeypatch.delenv("MLP_POSTGRES_DSN", raising=False)
    with pytest.raises(pydantic.ValidationError, match="placeholder"):
        Settings(environment="production")


def test_without_a_secrets_dir_only_the_environment_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLP_SECRETS_DIR", raising=False)
    monkeypatch.delenv("MLP_POSTGRES_DSN", raising=False)
    assert Settings().postgres_dsn == Settings.model_fields["postgres_dsn"].default
