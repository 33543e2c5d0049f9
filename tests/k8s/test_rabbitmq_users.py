"""RabbitMQ's users in the kind overlay: definitions imported at boot, from a generated Secret.

The external publisher's user must have exactly the permissions of the definitions users deploy
(examples/rabbitmq/external-publisher.definitions.json, tested against the real broker in
tests/e2e/test_bus_api_permissions.py); so must each platform service's user
(examples/rabbitmq/platform-services.definitions.json, tested in
tests/integration/test_service_rabbitmq_users.py); KEDA has a monitoring-only user; no password is in
a committed file, and RabbitMQ refuses to start on the template's placeholders.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from events.topology import requests_bound_policy
from mlp.settings import Settings
from tests.k8s.manifests import K8S_DIR, REPO, Manifest, Rendered, env_value, is_placeholder

pytestmark = pytest.mark.k8s

EXAMPLES_FILE = REPO / "examples" / "rabbitmq" / "external-publisher.definitions.json"
SERVICES_FILE = REPO / "examples" / "rabbitmq" / "platform-services.definitions.json"
# The services with a RabbitMQ user (the read API has none: it reads Postgres and Redis).
BUS_SERVICES = ("gateway", "worker", "collector", "dispatcher")
KIND_DATA = K8S_DIR / "overlays" / "kind" / "data"
KIND_TEMPLATE = KIND_DATA / "secrets" / "rabbitmq-definitions.json.example"
DEFINITIONS_SECRET = "mlp-rabbitmq-definitions"
DEFINITIONS_KEY = "definitions.json"
NO_RIGHTS = "^$"


def _json(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def _conf(text: str) -> dict[str, str]:
    """rabbitmq.conf (sysctl format): `key = value` lines, `#` comments."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _for_users(entries: list[dict[str, Any]], users: set[str]) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["user"] in users]


def _service_url(overlay: str, service: str) -> str:
    template = K8S_DIR / "overlays" / overlay / "secrets" / f"{service}.env.example"
    for line in template.read_text(encoding="utf-8").splitlines():
        if line.startswith("MLP_RABBITMQ_URL="):
            return line.partition("=")[2]
    raise AssertionError(f"{template}: no MLP_RABBITMQ_URL")


def _service_url_user(overlay: str, service: str) -> str:
    return unquote(urlsplit(_service_url(overlay, service)).username or "")


def _keda_url_user(overlay: str) -> str:
    template = K8S_DIR / "overlays" / overlay / "secrets" / "keda-rabbitmq.env.example"
    for line in template.read_text(encoding="utf-8").splitlines():
        if line.startswith("host="):
            return unquote(urlsplit(line.partition("=")[2]).username or "")
    raise AssertionError(f"{template}: no host")


def _external_users() -> set[str]:
    return {user["name"] for user in _json(EXAMPLES_FILE)["users"]}


def _generated(rendered: Rendered, kind: str, name: str) -> Manifest:
    """A generated ConfigMap or Secret: kustomize appends a content hash to its name (and references)."""
    (found,) = [o for o in rendered.of_kind(kind) if o["metadata"]["name"].rpartition("-")[0] == name]
    return found


def _rabbitmq(rendered: Rendered) -> Manifest:
    return rendered.one("StatefulSet", "mlp-rabbitmq")


def test_kind_external_user_has_exactly_the_permissions_of_the_examples_file() -> None:
    examples, kind = _json(EXAMPLES_FILE), _json(KIND_TEMPLATE)
    external = _external_users()
    assert external == {"mlp-external"}
    kind_users = {user["name"]: user for user in kind["users"]}
    for user in examples["users"]:
        assert kind_users[user["name"]]["tags"] == user["tags"]
    for section in ("permissions", "topic_permissions"):
        assert _for_users(kind[section], external) == examples[section], section
    for policy in examples["policies"]:
        assert policy in kind["policies"], policy["name"]


def test_kind_definitions_bound_the_requests_queues_as_the_platform_does() -> None:
    """The broker imports the requests queues' bound (the services' users may not set policies): the policy
    ``mlp policy`` would set for the default MLP_MAX_QUEUED_PER_MODEL, which the gateway's gauge shows."""
    policy = requests_bound_policy(Settings().max_queued_per_model)
    (imported,) = [p for p in _json(KIND_TEMPLATE)["policies"] if p["name"] == policy.name]
    assert imported == {
        "vhost": "/",
        "name": policy.name,
        "pattern": policy.pattern,
        "apply-to": policy.apply_to,
        "priority": policy.priority,
        "definition": policy.definition,
    }


def test_kind_definitions_create_every_vhost_they_use() -> None:
    """A blank node that imports definitions creates no default vhost: the file must."""
    kind = _json(KIND_TEMPLATE)
    declared = {vhost["name"] for vhost in kind["vhosts"]}
    used = {entry["vhost"] for section in ("permissions", "topic_permissions", "policies") for entry in kind[section]}
    # The AMQP URL's path is the vhost; an empty one (`.../`) means the default vhost `/`.
    service_vhosts = {unquote(urlsplit(_service_url("kind", s)).path[1:]) or "/" for s in BUS_SERVICES}
    assert used | service_vhosts <= declared
    users = {user["name"] for user in kind["users"]}
    granted = {entry["user"] for section in ("permissions", "topic_permissions") for entry in kind[section]}
    assert granted <= users, f"permissions for undefined users: {granted - users}"


@pytest.mark.parametrize("overlay", ["kind", "production"])
def test_platform_services_user_is_not_the_external_user(overlay: str) -> None:
    services = {_service_url_user(overlay, service) for service in BUS_SERVICES}
    keda = _keda_url_user(overlay)
    assert all(services)
    assert keda
    assert len(services) == len(BUS_SERVICES), "each service a user of its own"
    assert not services & _external_users()
    assert keda not in _external_users()
    assert keda not in services, "KEDA's user should be monitoring-only, not a service's"
    # Each service's URL names the user that the platform-services definitions give its permissions.
    assert services == {user["name"] for user in _json(SERVICES_FILE)["users"]}
    for service in BUS_SERVICES:
        assert _service_url_user(overlay, service) == f"mlp-{service}"


def test_kind_service_users_have_exactly_the_permissions_of_the_examples_file() -> None:
    examples, kind = _json(SERVICES_FILE), _json(KIND_TEMPLATE)
    services = {user["name"] for user in examples["users"]}
    kind_users = {user["name"]: user for user in kind["users"]}
    for user in examples["users"]:
        assert kind_users[user["name"]]["tags"] == user["tags"] == []  # no management access
        assert not user["password_hash"]
    for section in ("permissions", "topic_permissions"):
        assert _for_users(kind[section], services) == examples[section], section


def test_gateway_user_publishes_requests_and_declares_nothing() -> None:
    """The internet-facing service's user: no configure or read rights (it verifies the topology,
    MLP_TOPOLOGY=verify on its Deployment), writes only InferenceRequested to mlp.events."""
    examples = _json(SERVICES_FILE)
    (permission,) = _for_users(examples["permissions"], {"mlp-gateway"})
    assert (permission["configure"], permission["write"], permission["read"]) == (
        NO_RIGHTS,
        "^mlp\\.events$",
        NO_RIGHTS,
    )
    (topic,) = _for_users(examples["topic_permissions"], {"mlp-gateway"})
    assert topic["exchange"] == "mlp.events"
    assert re.match(topic["write"], "inference.requested.basic-model.alice")
    assert not re.match(topic["write"], "inference.completed.basic-model.alice")


def test_gateway_deployment_verifies_the_topology(rendered_all: dict[str, Rendered]) -> None:
    for overlay in ("overlays/kind", "overlays/production"):
        (container,) = rendered_all[overlay].one("Deployment", "mlp-gateway")["spec"]["template"]["spec"]["containers"]
        assert env_value(container, "MLP_TOPOLOGY") == "verify"


def test_kind_keda_user_is_monitoring_only() -> None:
    kind = _json(KIND_TEMPLATE)
    keda = _keda_url_user("kind")
    (user,) = [u for u in kind["users"] if u["name"] == keda]
    assert user["tags"] == ["monitoring"]
    for permission in _for_users(kind["permissions"], {keda}):
        assert (permission["configure"], permission["write"], permission["read"]) == (NO_RIGHTS,) * 3


def test_rendered_rabbitmq_imports_the_definitions_secret_at_boot(rendered_all: dict[str, Rendered]) -> None:
    for name in ("overlays/kind/data", "overlays/kind"):
        rendered = rendered_all[name]
        config = _generated(rendered, "ConfigMap", "mlp-rabbitmq-config")
        conf = _conf(config["data"]["20-mlp.conf"])
        assert conf["definitions.import_backend"] == "local_filesystem"
        path = Path(conf["definitions.local.path"])
        assert path.name == DEFINITIONS_KEY

        pod = _rabbitmq(rendered)["spec"]["template"]["spec"]
        secret = _generated(rendered, "Secret", DEFINITIONS_SECRET)
        secret_name = secret["metadata"]["name"]
        volumes = {v["name"] for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret_name}
        assert len(volumes) == 1
        for container in (*pod["initContainers"], *pod["containers"]):
            mounts = [m for m in container["volumeMounts"] if m["name"] in volumes]
            assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [(str(path.parent), True)]
            # Users come only from the definitions: no default user from the environment.
            assert not [e for e in container.get("env", []) if e["name"].startswith("RABBITMQ_DEFAULT_")]

        definitions = json.loads(base64.b64decode(secret["data"][DEFINITIONS_KEY]))
        assert definitions == _json(KIND_TEMPLATE)  # the test tree renders the template
        assert all(is_placeholder(user["password"]) for user in definitions["users"])


def test_broker_refuses_bodies_only_above_the_platform_body_limit() -> None:
    """Between the two limits a publisher gets a readable InferenceRejected; above, the broker refuses."""
    conf = _conf((KIND_DATA / "rabbitmq.conf").read_text(encoding="utf-8"))
    broker_limit = int(conf["max_message_size"])
    platform_limit = Settings.model_fields["max_body_bytes"].default
    assert isinstance(platform_limit, int)
    assert platform_limit < broker_limit <= 16 * 1024 * 1024


def _guard(rendered: Rendered) -> tuple[list[str], str]:
    """The init container's command without its last argument (the definitions path), and that path."""
    pod = _rabbitmq(rendered)["spec"]["template"]["spec"]
    (guard,) = [c for c in pod["initContainers"] if c["name"] == "refuse-placeholder-passwords"]
    command: list[str] = guard["command"]
    return command[:-1], command[-1]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_rabbitmq_refuses_to_start_on_placeholder_passwords(rendered_all: dict[str, Rendered], tmp_path: Path) -> None:
    command, path = _guard(rendered_all["overlays/kind/data"])
    assert path == _conf((KIND_DATA / "rabbitmq.conf").read_text(encoding="utf-8"))["definitions.local.path"]

    def start(definitions: Path) -> int:
        return subprocess.run([*command, str(definitions)], capture_output=True, check=False, timeout=30).returncode

    template = KIND_TEMPLATE.read_text(encoding="utf-8")
    placeholder = tmp_path / "placeholder.json"
    placeholder.write_text(template, encoding="utf-8")
    generated = tmp_path / "generated.json"
    generated.write_text(re.sub(r"changeme-[a-z-]+", "0123456789abcdef" * 3, template), encoding="utf-8")

    assert start(placeholder) != 0
    assert start(tmp_path / "missing.json") != 0
    assert start(generated) == 0
