"""``schemathesis run --checks all`` against the live gateway and read API finds nothing.

The documents must tell the truth: every status code a route answers is documented, every error body
has the documented shape, schema-valid requests are accepted and schema-invalid ones refused. The
services run as real processes (the collector too, so that the requests the gateway's run submits are
listed by the read API and its stateful phase follows them to the by-id and events routes). Bounded:
a few dozen examples per operation, about a minute for both.
"""

from __future__ import annotations

import importlib.util
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, platform_env, running_platform

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("schemathesis.toml")  # the read API's
GATEWAY_CONFIG = Path(__file__).with_name("schemathesis-gateway.toml")
# Small limits keep every request short: a long-poll waits at most 1 s, and the platform-wide max_tokens
# equals the default plan's per-request limit (a plan's own lower limit is a documented 422 the schema
# cannot state per user).
ENV = {"MLP_MAX_WAIT_S": "1", "MLP_MAX_TOKENS_LIMIT": "1024"}
NO_TRITON = "127.0.0.1:1"  # neither the gateway nor the read API calls Triton; no worker runs


def _admin_key(env: dict[str, str]) -> str | None:
    """An admin key made with `mlp keys` where the platform has a key store: the services then require
    keys, and schemathesis' ignored_auth check verifies that they do. None where every caller is open."""
    if importlib.util.find_spec("ops.keys") is None:
        return None
    subprocess.run([sys.executable, "-m", "ops.cli", "migrate"], env=env, check=True, capture_output=True)
    created = subprocess.run(
        [sys.executable, "-m", "ops.cli", "keys", "create", "schemathesis", "--admin"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def platform_and_key() -> Iterator[tuple[Platform, str | None]]:
    with isolated_namespace("st") as ns:
        # A bootstrap admin key too: the run may revoke every stored key through the admin routes (as it
        # should be able to), and the platform must not fall back to open mode under it.
        bootstrap = f"mlp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
        env = {**ENV, "MLP_API_KEYS": f"{bootstrap}=schemathesis-bootstrap/admin"}
        stored = _admin_key(platform_env(ns, NO_TRITON, env))
        key = bootstrap if stored is not None else None  # the one key no route can revoke
        with running_platform(ns, NO_TRITON, services=("collector", "api", "gateway"), extra_env=env) as platform:
            _requests_to_read(platform, key)
            yield platform, key


def _requests_to_read(platform: Platform, key: str | None) -> None:
    """A few requests, projected, so the read API's by-id and events routes have something to answer."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    seed = {"prompt": "test prompt", "user_id": "test-user", "model": "basic-model"}
    for _ in range(3):
        accepted = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=seed, headers=headers, timeout=10)
        assert accepted.status_code == 202, accepted.text

    deadline = time.monotonic() + 30
    while True:  # the collector projects them within milliseconds
        page = httpx.get(f"{platform.api_url}/api/v1/inference", headers=headers, timeout=10)
        if page.status_code == 200 and len(page.json()["items"]) >= 3:
            return
        assert time.monotonic() < deadline, page.text
        time.sleep(0.1)


def _schemathesis(url: str, key: str | None, workdir: Path, *, config: Path | None, max_examples: int) -> str:
    command = [sys.executable, "-m", "schemathesis.cli"]
    if config is not None:
        command += ["--config-file", str(config)]
    command += [
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(max_examples),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-12_000:] + result.stderr[-3_000:]
    return result.stdout


def test_the_gateway_matches_its_openapi_document(
    platform_and_key: tuple[Platform, str | None], tmp_path: Path
) -> None:
    platform, key = platform_and_key
    output = _schemathesis(platform.gateway_url, key, tmp_path, config=GATEWAY_CONFIG, max_examples=40)
    # No failure. Warnings may remain: the webhook routes by id answer 404 to generated ids (a webhook is
    # rarely created: generated URLs do not resolve to public addresses), which schemathesis reports.
    assert "Failures:" not in output, output[-4_000:]
    assert "No issues found" in output or " passed" in output, output[-4_000:]


def test_the_read_api_matches_its_openapi_document(
    platform_and_key: tuple[Platform, str | None], tmp_path: Path
) -> None:
    platform, key = platform_and_key
    output = _schemathesis(platform.api_url, key, tmp_path, config=CONFIG, max_examples=20)
    assert "No issues found" in output, output[-4_000:]
