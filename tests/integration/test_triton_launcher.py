"""The launcher on a real tritonserver: readiness, clean stop, a stopped server, and ``mlp triton``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from ml_service.client import TritonClient, TritonUnavailable
from ml_service.launcher import ServerOptions, TritonProcess
from tests.support.triton import free_triton_ports

pytestmark = pytest.mark.integration


def _group_is_gone(pid: int) -> bool:
    """No process is left in the server's process group (its Python stubs included)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_starts_ready_serves_and_stops_cleanly_then_calls_fail_fast(tmp_path: Path) -> None:
    server = TritonProcess(
        ServerOptions(ports=free_triton_ports(), models=("basic-model",), exit_timeout_s=5),
        log_path=tmp_path / "triton.log",
        ready_timeout_s=180,
    )
    # A long client timeout: a call that hung on the stopped server would end as TritonTimeout.
    client = TritonClient(server.grpc_url, timeout_s=60)
    try:
        async with server:
            pid = server.pid
            assert pid is not None
            assert server.running()
            assert server.probe()
            assert server.startup_s is not None
            assert (await client.infer("basic-model", "launched", 4)).text == "launched"
            assert await client.is_ready("basic-model")
            assert not await client.is_ready("slow-model")  # not asked for: explicit model control
        assert not server.running()
        assert server.stop() == 0  # exited on SIGTERM by itself, with status 0
        assert _group_is_gone(pid)
        assert not server.probe()
        assert "successfully unloaded 'basic-model'" in server.log_tail(200)
        with pytest.raises(TritonUnavailable) as caught:
            await client.infer("basic-model", "anyone there?", 4)
        assert caught.value.transient is True
        assert not await client.is_ready()
    finally:
        await client.close()
        await server.astop()


async def test_nothing_listening_is_triton_unavailable() -> None:
    client = TritonClient(f"127.0.0.1:{free_triton_ports().grpc}", timeout_s=60)
    try:
        with pytest.raises(TritonUnavailable):
            await client.infer("basic-model", "hello", 4)
    finally:
        await client.close()


async def test_mlp_triton_cli_reports_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    ports = free_triton_ports()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops.cli",
        "triton",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--models=basic-model",
        f"--log-file={tmp_path / 'triton.log'}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        # Bounded only to never hang the suite; not a timing assertion.
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=240)).decode()
        assert line.startswith("Triton ready in"), line + (tmp_path / "triton.log").read_text()
        assert f"gRPC 127.0.0.1:{ports.grpc}" in line
        client = TritonClient(f"127.0.0.1:{ports.grpc}", timeout_s=30)
        try:
            assert (await client.infer("basic-model", "from the cli", 3)).completion_tokens == 3
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=120) == 0
        assert proc.stderr is not None
        assert "stopping Triton" in (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
