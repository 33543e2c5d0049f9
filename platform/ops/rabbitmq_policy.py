"""``mlp policy``: apply the requests queues' bound (``MLP_MAX_QUEUED_PER_MODEL``) to the broker as a policy.

A policy, not a queue argument: RabbitMQ refuses to redeclare a quorum queue with other arguments, while a
policy applies to queues that already exist, at once, and changes with no redeclare and no restart
(docs/bus.md, "Backpressure"). Setting a policy takes the ``policymaker`` (or administrator) tag, which the
services' users lack on purpose: ``mlp up`` applies it locally, Kubernetes imports it with the broker's
definitions, and an operator runs this command (or the ``rabbitmqctl set_policy`` line it prints).

Two routes, like the tests' admin (tests/support/rabbitmq_admin.py): the management HTTP API when
``MLP_RABBITMQ_MANAGEMENT_URL`` names one; else ``rabbitmqctl`` for a broker on this machine; else the
management API on its default port of the broker's host, with the AMQP URL's credentials (``management_url_for``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from events.topology import QueuePolicy, requests_bound_policy
from mlp.settings import Settings, get_settings

TIMEOUT_S = 30.0
MANAGEMENT_PORT = 15672


class PolicyError(RuntimeError):
    """The policy could not be applied (no route to the broker's administration, or it refused)."""


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names: its path without the leading slash, unquoted; "/" when empty."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def management_url_for(amqp_url: str, management_url: str, rabbitmqctl_on_path: bool) -> str:
    """The management API to use ("" for rabbitmqctl): the named one, else none for a broker on this
    machine when rabbitmqctl is here, else the broker host's management port with the AMQP credentials."""
    if management_url:
        return management_url
    amqp = urlsplit(amqp_url)
    host = amqp.hostname or "127.0.0.1"
    if rabbitmqctl_on_path and host in LOOPBACK_HOSTS:
        return ""
    netloc = f"{amqp.username or 'guest'}:{amqp.password or 'guest'}@{host}:{MANAGEMENT_PORT}"
    return urlunsplit(("http", netloc, "", "", ""))


def rabbitmqctl_args(policy: QueuePolicy, vhost: str) -> list[str]:
    """The ``rabbitmqctl`` arguments that set ``policy`` on ``vhost`` (idempotent: a set replaces)."""
    return [
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        policy.apply_to,
        "--priority",
        str(policy.priority),
        policy.name,
        policy.pattern,
        json.dumps(policy.definition, sort_keys=True),
    ]


def management_request(policy: QueuePolicy, vhost: str) -> tuple[str, dict[str, object]]:
    """The management API's path and body that set ``policy`` on ``vhost`` (PUT)."""
    path = "/api/policies/" + "/".join(quote(segment, safe="") for segment in (vhost, policy.name))
    body: dict[str, object] = {
        "pattern": policy.pattern,
        "definition": dict(policy.definition),
        "priority": policy.priority,
        "apply-to": policy.apply_to,
    }
    return path, body


def apply_policy(policy: QueuePolicy, vhost: str, management_url: str = "") -> str:
    """Set ``policy`` on ``vhost``; returns the route taken. Raises PolicyError."""
    if management_url:
        parts = urlsplit(management_url)
        base = urlunsplit((parts.scheme or "http", f"{parts.hostname}:{parts.port or MANAGEMENT_PORT}", "", "", ""))
        path, body = management_request(policy, vhost)
        try:
            with httpx.Client(
                base_url=base, auth=(unquote(parts.username or ""), unquote(parts.password or "")), timeout=TIMEOUT_S
            ) as client:
                client.put(path, json=body).raise_for_status()
        except httpx.HTTPError as exc:
            raise PolicyError(f"management API at {base}: {type(exc).__name__}: {exc}") from exc
        return f"management API {base}"
    if shutil.which("rabbitmqctl") is None:
        raise PolicyError("no MLP_RABBITMQ_MANAGEMENT_URL and no rabbitmqctl on PATH")
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", *rabbitmqctl_args(policy, vhost)], check=True, capture_output=True, timeout=TIMEOUT_S
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        raise PolicyError(f"rabbitmqctl: {exc}: {stderr.decode(errors='replace').strip()}") from exc
    return "rabbitmqctl"


def apply_requests_bound(settings: Settings) -> str:
    """The bound of ``settings`` on its vhost (``mlp up``, the tests' fixtures); returns the route taken."""
    management = management_url_for(
        settings.rabbitmq_url, settings.rabbitmq_management_url, shutil.which("rabbitmqctl") is not None
    )
    return apply_policy(
        requests_bound_policy(settings.max_queued_per_model), vhost_of(settings.rabbitmq_url), management
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mlp policy",
        description="Apply the requests queues' bound (MLP_MAX_QUEUED_PER_MODEL) to the broker as a RabbitMQ policy.",
    )
    parser.add_argument("--print", action="store_true", help="print the rabbitmqctl command instead of running it")
    args = parser.parse_args(argv)
    settings = get_settings()
    policy = requests_bound_policy(settings.max_queued_per_model)
    vhost = vhost_of(settings.rabbitmq_url)
    if args.print:
        print(shlex.join(["rabbitmqctl", *rabbitmqctl_args(policy, vhost)]))
        return 0
    try:
        route = apply_requests_bound(settings)
    except PolicyError as exc:
        print(f"mlp policy: {exc}", file=sys.stderr)
        return 1
    print(f"policy {policy.name} on vhost {vhost!r}: max-length {settings.max_queued_per_model} ({route})")
    return 0
