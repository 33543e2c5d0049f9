"""The examples in examples/ run against the real platform and get a completed inference."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_service.launcher import TritonProcess
from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform
from tests.support.triton import triton_server

pytestmark = pytest.mark.e2e
__all__ = ["triton_server"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def platform(triton_server: TritonProcess) -> Iterator[Platform]:
    with isolated_namespace("examples") as ns, running_platform(ns, triton_server.grpc_url) as running:
        yield running


def _run(script: str, args: list[str], env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr + result.stdout
    outcome: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


def test_the_bus_client_example_gets_a_completion(platform: Platform) -> None:
    env = {"PATH": "/usr/bin:/bin", "MLP_BUS_URL": platform.namespace.rabbitmq_url}
    outcome = _run("bus_client.py", ["--user", "example-bus", "--prompt", "test prompt"], env)
    assert outcome["type"] == "InferenceCompleted"
    assert outcome["completion"]


def test_the_http_client_example_gets_a_completion(platform: Platform) -> None:
    env = {"PATH": "/usr/bin:/bin", "MLP_GATEWAY_URL": platform.gateway_url, "MLP_API_URL": platform.api_url}
    outcome = _run("http_client.py", ["--user", "example-http", "--prompt", "test prompt"], env)
    assert outcome["status"] == "completed"
