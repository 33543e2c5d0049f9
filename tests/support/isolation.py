"""Per-run isolation on the shared machine services: a RabbitMQ vhost, a Postgres database, a Redis prefix.

The services outlive every test run (CI runs on the same machine), so each run gets its
own namespace in each and removes it afterwards, also on failure.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

BASE_RABBITMQ_URL = os.environ.get("MLP_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
BASE_POSTGRES_DSN = os.environ.get("MLP_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
BASE_REDIS_URL = os.environ.get("MLP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Namespace:
    name: str
    rabbitmq_url: str
    postgres_dsn: str
    redis_url: str
    redis_prefix: str

    def env(self) -> dict[str, str]:
        """Environment variables that point a service process at this namespace."""
        return {
            "MLP_ENVIRONMENT": "test",
            "MLP_RABBITMQ_URL": self.rabbitmq_url,
            "MLP_POSTGRES_DSN": self.postgres_dsn,
            "MLP_REDIS_URL": self.redis_url,
            "MLP_REDIS_PREFIX": self.redis_prefix,
        }


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


@contextmanager
def isolated_namespace(label: str = "t") -> Iterator[Namespace]:
    name = f"mlp_{label}_{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield Namespace(
            name=name,
            rabbitmq_url=_with_path(BASE_RABBITMQ_URL, "/" + name),
            postgres_dsn=_with_path(BASE_POSTGRES_DSN, "/" + name),
            redis_url=BASE_REDIS_URL,
            redis_prefix=f"{name}:",
        )
    finally:
        _cleanup(name)


def _cleanup(name: str) -> None:
    import asyncio
    import concurrent.futures

    import redis

    from mlp.db import drop_database

    try:
        _rabbitmqctl("delete_vhost", name)
    except Exception as exc:  # keep cleaning the others
        print(f"cleanup: delete_vhost {name}: {exc}")
    try:
        # In a thread of its own: the caller may be inside a running event loop (async tests).
        dsn = _with_path(BASE_POSTGRES_DSN, "/" + name)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, drop_database(dsn)).result(timeout=60)
    except Exception as exc:
        print(f"cleanup: drop database {name}: {exc}")
    try:
        client = redis.Redis.from_url(BASE_REDIS_URL)
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    except Exception as exc:
        print(f"cleanup: redis keys {name}: {exc}")
