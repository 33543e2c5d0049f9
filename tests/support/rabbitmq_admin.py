"""RabbitMQ administration for the tests (vhosts, users, permissions, policies), by one of two routes.

``rabbitmqctl`` works where the broker is this machine's own node and the tests run as root (CI, the
shared development machines). A broker in a container, or on another host, is administered through its
management HTTP API instead: testcontainers' RabbitMQ exports ``MLP_TEST_RABBITMQ_MANAGEMENT_URL``.
``choose_admin`` decides which; ``rabbitmq_admin()`` builds it from the environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

MANAGEMENT_URL_VARIABLE = "MLP_TEST_RABBITMQ_MANAGEMENT_URL"
MANAGEMENT_PORT = 15672
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
TIMEOUT_S = 60.0


class RabbitmqAdmin(Protocol):
    def add_vhost(self, vhost: str) -> None: ...
    def delete_vhost(self, vhost: str) -> None: ...
    def add_user(self, user: str, password: str) -> None: ...
    def delete_user(self, user: str) -> None: ...
    def set_permissions(self, vhost: str, user: str, configure: str, write: str, read: str) -> None: ...
    def set_topic_permissions(self, vhost: str, user: str, exchange: str, write: str, read: str) -> None: ...
    def set_policy(
        self, vhost: str, name: str, pattern: str, definition: Mapping[str, Any], priority: int, apply_to: str
    ) -> None: ...
    def queue_policy(self, vhost: str, queue: str) -> str | None:
        """The name of the policy in effect on ``queue`` (None: none, or no such queue)."""
        ...

    def queue_binding_keys(self, vhost: str, queue: str, exchange: str) -> set[str]:
        """The routing keys ``queue`` is bound to on ``exchange``."""
        ...

    def close_connections_named(self, name: str, reason: str) -> int:
        """Close, from the broker's side, the connections whose client named them ``name`` (the
        ``connection_name`` client property: ``mlp.bus.connection_name``); how many were closed."""
        ...


@dataclass(frozen=True)
class UseRabbitmqctl:
    pass


@dataclass(frozen=True)
class UseManagementApi:
    url: str  # http://user:password@host:port


def choose_admin(
    amqp_url: str, management_url: str | None, rabbitmqctl_on_path: bool
) -> UseRabbitmqctl | UseManagementApi:
    """The management API where one is named; else ``rabbitmqctl`` for a broker on this machine; else the
    management API on its default port of the broker's host, with the AMQP URL's credentials."""
    if management_url:
        return UseManagementApi(management_url)
    amqp = urlsplit(amqp_url)
    if rabbitmqctl_on_path and (amqp.hostname or "127.0.0.1") in LOOPBACK_HOSTS:
        return UseRabbitmqctl()
    netloc = f"{amqp.username or 'guest'}:{amqp.password or 'guest'}@{amqp.hostname or '127.0.0.1'}:{MANAGEMENT_PORT}"
    return UseManagementApi(urlunsplit(("http", netloc, "", "", "")))


class Rabbitmqctl:
    def _run(self, *args: str) -> str:
        done = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=TIMEOUT_S)
        return done.stdout.decode()

    def queue_policy(self, vhost: str, queue: str) -> str | None:
        for line in self._run("list_queues", "-p", vhost, "--no-table-headers", "name", "policy").splitlines():
            name, _, policy = line.partition("\t")
            if name == queue:
                return policy.strip() or None
        return None

    def queue_binding_keys(self, vhost: str, queue: str, exchange: str) -> set[str]:
        out = self._run(
            "list_bindings", "-p", vhost, "--no-table-headers", "source_name", "destination_name", "routing_key"
        )
        keys = set()
        for line in out.splitlines():
            source, destination, key = [*line.split("\t"), "", "", ""][:3]
            if source == exchange and destination == queue:
                keys.add(key.strip())
        return keys

    def close_connections_named(self, name: str, reason: str) -> int:
        # This CLI lists the client's name only inside client_properties (no user_provided_name column).
        listed = self._run("list_connections", "--no-table-headers", "pid", "client_properties")
        named = f'{{"connection_name","{name}"}}'
        pids = [line.partition("\t")[0] for line in listed.splitlines() if named in line]
        for pid in pids:
            self._run("close_connection", pid, reason)
        return len(pids)

    def add_vhost(self, vhost: str) -> None:
        self._run("add_vhost", vhost)

    def delete_vhost(self, vhost: str) -> None:
        self._run("delete_vhost", vhost)

    def add_user(self, user: str, password: str) -> None:
        self._run("add_user", user, password)

    def delete_user(self, user: str) -> None:
        self._run("delete_user", user)

    def set_permissions(self, vhost: str, user: str, configure: str, write: str, read: str) -> None:
        self._run("set_permissions", "-p", vhost, user, configure, write, read)

    def set_topic_permissions(self, vhost: str, user: str, exchange: str, write: str, read: str) -> None:
        self._run("set_topic_permissions", "-p", vhost, user, exchange, write, read)

    def set_policy(
        self, vhost: str, name: str, pattern: str, definition: Mapping[str, Any], priority: int, apply_to: str
    ) -> None:
        import json

        self._run(
            "set_policy",
            "-p",
            vhost,
            "--apply-to",
            apply_to,
            "--priority",
            str(priority),
            name,
            pattern,
            json.dumps(definition),
        )


class ManagementApi:
    """The same operations over the management plugin's HTTP API (``/api/...``)."""

    def __init__(self, url: str, transport: httpx.BaseTransport | None = None) -> None:
        parts = urlsplit(url)
        self._base = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port or MANAGEMENT_PORT}", "", "", ""))
        self._auth = (parts.username or "guest", parts.password or "guest")
        self._transport = transport

    def _request(
        self, method: str, *path: str, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        # Each segment quoted whole: the default vhost "/" is "%2F" in a path.
        url = "/api/" + "/".join(quote(segment, safe="") for segment in path)
        with httpx.Client(base_url=self._base, auth=self._auth, timeout=TIMEOUT_S, transport=self._transport) as client:
            return client.request(method, url, json=body, headers=headers)

    def _send(
        self, method: str, *path: str, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        self._request(method, *path, body=body, headers=headers).raise_for_status()

    def close_connections_named(self, name: str, reason: str) -> int:
        reply = self._request("GET", "connections")
        reply.raise_for_status()
        named = [c["name"] for c in reply.json() if c.get("client_properties", {}).get("connection_name") == name]
        for connection in named:
            self._send("DELETE", "connections", connection, headers={"X-Reason": reason})
        return len(named)

    def queue_policy(self, vhost: str, queue: str) -> str | None:
        reply = self._request("GET", "queues", vhost, queue)
        if reply.status_code == 404:
            return None
        reply.raise_for_status()
        policy = reply.json().get("policy")
        return str(policy) if policy else None

    def queue_binding_keys(self, vhost: str, queue: str, exchange: str) -> set[str]:
        reply = self._request("GET", "bindings", vhost, "e", exchange, "q", queue)
        reply.raise_for_status()
        return {str(b["routing_key"]) for b in reply.json()}

    def add_vhost(self, vhost: str) -> None:
        self._send("PUT", "vhosts", vhost)

    def delete_vhost(self, vhost: str) -> None:
        self._send("DELETE", "vhosts", vhost)

    def add_user(self, user: str, password: str) -> None:
        self._send("PUT", "users", user, body={"password": password, "tags": ""})

    def delete_user(self, user: str) -> None:
        self._send("DELETE", "users", user)

    def set_permissions(self, vhost: str, user: str, configure: str, write: str, read: str) -> None:
        self._send("PUT", "permissions", vhost, user, body={"configure": configure, "write": write, "read": read})

    def set_topic_permissions(self, vhost: str, user: str, exchange: str, write: str, read: str) -> None:
        self._send("PUT", "topic-permissions", vhost, user, body={"exchange": exchange, "write": write, "read": read})

    def set_policy(
        self, vhost: str, name: str, pattern: str, definition: Mapping[str, Any], priority: int, apply_to: str
    ) -> None:
        body = {"pattern": pattern, "definition": dict(definition), "priority": priority, "apply-to": apply_to}
        self._send("PUT", "policies", vhost, name, body=body)


def rabbitmq_admin(amqp_url: str) -> RabbitmqAdmin:
    """The admin for the broker at ``amqp_url`` (read the environment now: provisioning may have just set it)."""
    choice = choose_admin(amqp_url, os.environ.get(MANAGEMENT_URL_VARIABLE), shutil.which("rabbitmqctl") is not None)
    if isinstance(choice, UseManagementApi):
        return ManagementApi(choice.url)
    return Rabbitmqctl()
