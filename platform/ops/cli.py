"""The ``mlp`` command: one entry point for every service and operation.

Services are started through their own composition roots (``<service>.main``); every operator command
lives in ``ops/`` and parses its own arguments, so the CLI stays a thin dispatcher (and starting one
service never imports the others).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("ops.up", "main", "run everything locally: migrations, Triton and the five services"),
    "gateway": ("api_gateway.main", "main", "run the API gateway (HTTP :8080)"),
    "worker": ("ml_worker.main", "main", "run an ML worker (consumes requests, calls Triton)"),
    "collector": ("results_collector.main", "main", "run the results collector (projections)"),
    "api": ("read_api.main", "main", "run the read API (HTTP :8081)"),
    "dispatcher": ("webhook_dispatcher.main", "main", "run the webhook dispatcher (signed deliveries)"),
    "triton": ("ops.triton", "main", "run the local Triton server on triton_models/"),
    "migrate": ("ops.migrate", "main", "apply database migrations (creates the database)"),
    "replay": ("ops.replay", "main", "rebuild the read models and Redis state from the event store"),
    "quota": ("ops.quota", "main", "show or set a user's quota plan and limits"),
    "keys": ("ops.keys", "main", "create, list, revoke or rotate API keys"),
    "webhooks": ("ops.webhooks", "main", "list webhook deliveries or replay failed ones"),
    "policy": (
        "ops.rabbitmq_policy",
        "main",
        "apply the requests queues' bound (MLP_MAX_QUEUED_PER_MODEL) as a policy",
    ),
    "dlq": ("ops.dlq", "main", "list or re-drive dead-lettered messages"),
    "bench": ("ops.bench.main", "main", "benchmark the platform end to end"),
    "docs": ("ops.docs", "main", "generate, check or serve the event bus contract (AsyncAPI)"),
    "k8s": ("ops.k8s", "main", "generate or check the Kubernetes workers of the registry's models"),
    "status": ("ops.status", "main", "one screen of the platform's health (--json; exit 1 when unhealthy)"),
    "reconcile": ("ops.reconcile", "main", "prove the books balance: events, read models, ledger, Redis (--repair)"),
    "monitoring": ("ops.monitoring", "main", "generate or check the PrometheusRule from k8s/monitoring/rules.yaml"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: mlp <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `mlp <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"mlp: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    entry: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    return entry(rest)


if __name__ == "__main__":
    raise SystemExit(main())
