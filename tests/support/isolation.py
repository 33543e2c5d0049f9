"""Per-run isolation on the shared machine services: a RabbitMQ vhost, a Postgres database, a Redis prefix.

The services outlive every test run (CI runs on the same machine), so each run gets its
own namespace in each and removes it afterwards, also on failure. Where the services are is
``tests.support.provision``'s business: the URLs are read when a namespace is made, after it has
exported those of any container it started.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from tests.support.provision import ensure_services, service_url
from tests.support.rabbitmq_admin import RabbitmqAdmin, rabbitmq_admin


def base_rabbitmq_url() -> str:
    return service_url("rabbitmq")


def base_postgres_dsn() -> str:
    return service_url("postgres")


def base_redis_url() -> str:
    return service_url("redis")


def broker_admin() -> RabbitmqAdmin:
    """Vhosts, users and permissions on the tests' broker (rabbitmqctl here, its HTTP API in a container)."""
    return rabbitmq_admin(base_rabbitmq_url())


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
    ensure_services()
    name = f"mlp_{label}_{uuid.uuid4().hex[:10]}"
    rabbitmq_url = base_rabbitmq_url()
    admin = broker_admin()
    admin.add_vhost(name)
    try:
        admin.set_permissions(name, urlsplit(rabbitmq_url).username or "guest", ".*", ".*", ".*")
        yield Namespace(
            name=name,
            rabbitmq_url=_with_path(rabbitmq_url, "/" + name),
            postgres_dsn=_with_path(base_postgres_dsn(), "/" + name),
            redis_url=base_redis_url(),
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
        broker_admin().delete_vhost(name)
    except Exception as exc:  # keep cleaning the others
        print(f"cleanup: delete_vhost {name}: {exc}")
    try:
        # In a thread of its own: the caller may be inside a running event loop (async tests).
        dsn = _with_path(base_postgres_dsn(), "/" + name)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, drop_database(dsn)).result(timeout=60)
    except Exception as exc:
        print(f"cleanup: drop database {name}: {exc}")
    try:
        client = redis.Redis.from_url(base_redis_url())
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    except Exception as exc:
        print(f"cleanup: redis keys {name}: {exc}")
