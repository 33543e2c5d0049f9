"""A real Prometheus for a test: its own free port, temporary storage and configuration; queried over its
HTTP API. Debian's package installs the binary (scripts/ensure-monitoring); its own service is never used."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

INSTALL_HINT = "install Prometheus: scripts/ensure-monitoring (apt-get install prometheus)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ScrapeJob:
    name: str
    target: str  # host:port
    path: str = "/metrics"
    params: Mapping[str, Sequence[str]] | None = None

    def config(self) -> dict[str, Any]:
        job: dict[str, Any] = {"job_name": self.name, "metrics_path": self.path}
        if self.params:
            job["params"] = {k: list(v) for k, v in self.params.items()}
        job["static_configs"] = [{"targets": [self.target]}]
        return job


def prometheus_config(jobs: Sequence[ScrapeJob], rule_files: Sequence[Path], interval_s: int = 1) -> str:
    return yaml.safe_dump(
        {
            "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [job.config() for job in jobs],
        },
        sort_keys=False,
    )


Sample = tuple[dict[str, str], float]


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """An instant query's vector: (labels, value) per series."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of a query (None when empty); fails on several series."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return result[0][1] if result else None

    def wait_for(self, expr: str, what: str, timeout_s: float = 30.0) -> list[Sample]:
        """Until the query returns something (a series, or a comparison that holds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus: not within {timeout_s}s: {what} ({expr})\n{self.log_tail()}", pytrace=False)
            time.sleep(0.25)

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def targets_up(self) -> dict[str, bool]:
        return {t["labels"]["job"]: t["health"] == "up" for t in self.api("targets")["activeTargets"]}


@contextlib.contextmanager
def running_prometheus(workdir: Path, config: str, ready_timeout_s: float = 30.0) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(f"prometheus is not installed: {INSTALL_HINT}", pytrace=False)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(config, encoding="utf-8")
    port = _free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{prometheus.log_tail()}", pytrace=False)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready in {ready_timeout_s}s:\n{prometheus.log_tail()}", pytrace=False)
            time.sleep(0.2)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
