"""``mlp triton``: run the local Triton server (CPU) on ``triton_models/`` until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ml_service.bundle import docker_hint
from ml_service.launcher import (
    LauncherError,
    ServerOptions,
    TritonNotSupported,
    TritonPorts,
    TritonProcess,
    default_model_repository,
    port_of,
)
from mlp.settings import get_settings


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="mlp triton", description="Run the local Triton server (CPU).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=settings.triton_http_port)
    parser.add_argument("--grpc-port", type=int, default=port_of(settings.triton_url, 8001))
    parser.add_argument("--metrics-port", type=int, default=settings.triton_metrics_port)
    parser.add_argument("--model-repository", type=Path, default=default_model_repository())
    parser.add_argument("--models", default="", help="comma-separated models to load (default: all)")
    parser.add_argument("--log-file", type=Path, default=None, help="write Triton's log here, not to stdout")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds (default: %(default)s)")
    return parser.parse_args(list(argv))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    options = ServerOptions(
        model_repository=args.model_repository.resolve(),
        ports=TritonPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port),
        host=args.host,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
    )
    server = TritonProcess(options, log_path=args.log_file, ready_timeout_s=args.ready_timeout)
    hint = docker_hint(options.model_repository, args.http_port, args.grpc_port, args.metrics_port)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a pod's stop: same path as Ctrl-C
    try:
        return _serve(server, options, hint)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(server: TritonProcess, options: ServerOptions, hint: str) -> int:
    try:
        server.start()
        print(
            f"Triton ready in {server.startup_s:.1f} s: gRPC {server.grpc_url} (MLP_TRITON_URL), "
            f"HTTP {server.http_url}, metrics {server.metrics_url}; models from {options.model_repository}. "
            "Ctrl-C stops it.",
            flush=True,
        )
        code = server.wait()
        print(f"mlp triton: tritonserver exited with code {code}", file=sys.stderr)
        return 1
    except TritonNotSupported as exc:
        print(f"mlp triton: {exc}\n{hint}", file=sys.stderr)
        return 3
    except LauncherError as exc:
        print(f"mlp triton: {exc}\n\nIf the bundled server cannot run here: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlp triton: stopping Triton ...", file=sys.stderr, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not orphan Triton
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
