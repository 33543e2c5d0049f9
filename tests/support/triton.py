"""One real Triton for a test session, on free ports (other test runs may run their own Triton).

Use the fixture: import it into a test module (``from tests.support.triton import triton_server``)
or, for the whole suite, list this module in ``pytest_plugins`` of the root conftest. Or use
``running_triton(log_dir)`` as a context manager in a fixture of your own. If Triton cannot
start, the fixture fails with its log tail: nothing is skipped.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from ml_service.launcher import (
    LauncherError,
    ServerOptions,
    TraceOptions,
    TritonPorts,
    TritonProcess,
    TritonStartError,
)

# The session's Triton: the cheap models. A test of the real model (all-minilm-l6-v2: PyTorch, ~25 s to
# load) starts a Triton of its own with ``running_triton(..., models=REAL_MODELS)``.
TEST_MODELS = ("basic-model", "slow-model")
REAL_MODELS = ("all-minilm-l6-v2",)
# The 2-core CI machine is shared: give Triton time to load, and fail loudly after that.
READY_TIMEOUT_S = 180.0


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out (held together, so they are distinct)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_triton_ports() -> TritonPorts:
    http, grpc, metrics = free_ports(3)
    return TritonPorts(http=http, grpc=grpc, metrics=metrics)


@contextmanager
def running_triton(
    log_dir: Path, models: Sequence[str] = TEST_MODELS, attempts: int = 3, trace: TraceOptions | None = None
) -> Iterator[TritonProcess]:
    """A ready Triton on free ports, stopped afterwards; retries when another process took a port.
    ``trace``: Triton's own OpenTelemetry tracing (off by default)."""
    for attempt in range(1, attempts + 1):
        options = ServerOptions(ports=free_triton_ports(), models=tuple(models), exit_timeout_s=5, trace=trace)
        server = TritonProcess(options, log_path=log_dir / f"triton-{attempt}.log", ready_timeout_s=READY_TIMEOUT_S)
        try:
            server.start()
        except TritonStartError:
            if attempt < attempts and "already in use" in server.log_tail(200):
                continue  # lost a race for a port
            raise
        try:
            yield server
        finally:
            server.stop()
        return


@contextmanager
def triton_or_fail(log_dir: Path, models: Sequence[str], trace: TraceOptions | None = None) -> Iterator[TritonProcess]:
    """``running_triton`` for a fixture: a Triton that cannot start fails the test with its log tail."""
    stack = ExitStack()
    try:
        server = stack.enter_context(running_triton(log_dir, models, trace=trace))
    except LauncherError as exc:
        pytest.fail(f"Triton could not start (logs in {log_dir}):\n{exc}", pytrace=False)
    with stack:
        yield server


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """The session's Triton (basic-model and slow-model); ``.grpc_url`` is what MLP_TRITON_URL takes."""
    with triton_or_fail(tmp_path_factory.mktemp("triton"), TEST_MODELS) as server:
        yield server
