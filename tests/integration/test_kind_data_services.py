"""The kind overlay's data-service configuration, rehearsed with the real servers of this machine.

PostgreSQL: a private, password-protected cluster of its own (initdb, scram-sha-256 over TCP, as the
postgres image sets up) gets what the image does at its first start: the database, then
k8s/overlays/kind/data/postgres/10-mlp-roles.sh with the Secret's password files. Then `mlp migrate`
runs as mlp_migrate (no superuser, no CREATEROLE) and each service logs in with its own password.
Redis: redis-server runs the overlay's redis.conf with the Secret's password file.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis

from projections.migrate import migrate
from projections.postgres import store_and_project
from projections.queries import get_request
from projections.sample_events import request_stream
from quota.store import fetch_limits
from tests.k8s.manifests import K8S_DIR

pytestmark = pytest.mark.integration

KIND_DATA = K8S_DIR / "overlays" / "kind" / "data"
INIT_SCRIPT = KIND_DATA / "postgres" / "10-mlp-roles.sh"
PASSWORDS_TEMPLATE = KIND_DATA / "secrets" / "postgres.env.example"
SERVICE_USERS = {
    "mlp_gateway_app": "MLP_GATEWAY_PASSWORD",
    "mlp_worker_app": "MLP_WORKER_PASSWORD",
    "mlp_collector_app": "MLP_COLLECTOR_PASSWORD",
    "mlp_read_api_app": "MLP_READ_API_PASSWORD",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(args: list[str | Path], env: dict[str, str] | None = None) -> None:
    subprocess.run([str(a) for a in args], env=env, check=True, capture_output=True, timeout=120)


def _bindir() -> Path:
    return Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())


@dataclass(frozen=True)
class KindPostgres:
    port: int
    passwords: dict[str, str]

    def dsn(self, user: str, password: str | None = None, database: str = "mlp") -> str:
        secret = self.passwords[SERVICE_USERS.get(user, "MLP_MIGRATE_PASSWORD")] if password is None else password
        return f"postgresql://{user}:{secret}@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def kind_postgres() -> Iterator[KindPostgres]:
    if os.geteuid() != 0 or shutil.which("pg_config") is None:
        pytest.skip("needs root (to run a private cluster as the postgres user) and the PostgreSQL binaries")
    owner = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="mlp-kind-pg-", dir="/tmp"))
    os.chown(root, owner.pw_uid, owner.pw_gid)
    bindir, port = _bindir(), _free_port()
    as_postgres: list[str | Path] = ["runuser", "-u", "postgres", "--"]
    # The Secret mlp-postgres, as the pod sees it: one file per key of the (generated) env file.
    keys = [line.split("=", 1)[0] for line in PASSWORDS_TEMPLATE.read_text().splitlines() if "=" in line]
    passwords = {key: secrets.token_hex(24) for key in keys if not key.startswith("#")}
    secrets_dir = root / "secrets"
    secrets_dir.mkdir()
    for key, value in passwords.items():
        (secrets_dir / key).write_text(value)
    superuser_file = root / "superuser"
    superuser_file.write_text(passwords["POSTGRES_PASSWORD"])
    os.chown(superuser_file, owner.pw_uid, owner.pw_gid)
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    os.chown(sockets, owner.pw_uid, owner.pw_gid)
    _run([*as_postgres, bindir / "initdb", "-D", data, "-U", "postgres", "--auth-local=trust",
          "--auth-host=scram-sha-256", f"--pwfile={superuser_file}"])  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets}"
    _run([*as_postgres, bindir / "pg_ctl", "-D", data, "-l", root / "log", "-o", options, "-w", "start"])
    try:
        local = {**os.environ, "PGHOST": str(sockets), "PGPORT": str(port)}
        _run(["psql", "-U", "postgres", "-d", "postgres", "-c", "CREATE DATABASE mlp"], env=local)
        # The image's first start: POSTGRES_USER/POSTGRES_DB set, the init scripts on the local socket.
        first_start = {
            **local,
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "mlp",
            "MLP_POSTGRES_SECRETS": str(secrets_dir),
        }
        _run(["sh", INIT_SCRIPT], env=first_start)
        yield KindPostgres(port=port, passwords=passwords)
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def migrated_kind_postgres(kind_postgres: KindPostgres) -> KindPostgres:
    applied = await migrate(kind_postgres.dsn("mlp_migrate"))
    assert 5 in [m.version for m in applied]
    return kind_postgres


async def test_the_migrations_owner_is_no_superuser_and_owns_the_schema(migrated_kind_postgres: KindPostgres) -> None:
    conn = await asyncpg.connect(migrated_kind_postgres.dsn("mlp_migrate"))
    try:
        role = await conn.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'mlp_migrate'"
        )
        assert role is not None
        assert tuple(role) == (False, False, False)
        owners = {r[0] for r in await conn.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
        assert owners == {"mlp_migrate"}
        assert await migrate(migrated_kind_postgres.dsn("mlp_migrate")) == []  # a rerun of the Job: nothing to do
    finally:
        await conn.close()


async def test_each_service_logs_in_with_its_own_password_and_role(migrated_kind_postgres: KindPostgres) -> None:
    pg = migrated_kind_postgres
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg.dsn("mlp_collector_app", password=pg.passwords["MLP_GATEWAY_PASSWORD"]))

    events = request_stream("kind-roles-1", user_id="kind-alice")
    collector = await asyncpg.connect(pg.dsn("mlp_collector_app"))
    try:
        assert len(await store_and_project(collector, events)) == len(events)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await collector.execute("DROP TRIGGER event_store_append_only ON event_store")
    finally:
        await collector.close()
    for user in ("mlp_gateway_app", "mlp_worker_app"):
        conn = await asyncpg.connect(pg.dsn(user))
        try:
            assert (await fetch_limits(conn, "kind-alice", "free")).plan == "free"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("SELECT count(*) FROM event_store")
        finally:
            await conn.close()
    read_api = await asyncpg.connect(pg.dsn("mlp_read_api_app"))
    try:
        view = await get_request(read_api, "kind-roles-1")
        assert view is not None
        assert view.status == "completed"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await read_api.execute("DELETE FROM inference_requests")
    finally:
        await read_api.close()


def test_redis_runs_the_overlay_config_with_the_secret_password(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    password = secrets.token_hex(24)
    template = (KIND_DATA / "secrets" / "redis-auth.conf.example").read_text()
    auth = tmp_path / "redis-auth.conf"
    auth.write_text(template.replace("changeme-redis", password))
    conf_text = (KIND_DATA / "redis.conf").read_text()
    assert "include /run/secrets/mlp-redis/redis-auth.conf" in conf_text  # the Secret's mount in redis.yaml
    conf = tmp_path / "redis.conf"
    conf.write_text(conf_text.replace("/run/secrets/mlp-redis/redis-auth.conf", str(auth)))
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", str(conf), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        authed = redis.Redis(port=port, password=password, socket_timeout=2)
        for _ in range(50):
            try:
                if authed.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.1)
        assert authed.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert authed.config_get("save") == {"save": ""}
        assert authed.config_get("appendonly") == {"appendonly": "no"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
    finally:
        server.terminate()
        server.wait(timeout=10)
