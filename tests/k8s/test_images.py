"""The Dockerfiles, .dockerignore and compose.yaml follow the same rules as the manifests: pinned
base images, non-root, only the wheel in the platform image, no secrets in the build context.
(No Docker on this machine: these are static checks; docs/kubernetes.md has the build commands.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.manifests import REPO, Rendered, ident, namespace_of, workloads
from tests.k8s.test_policies import PINNED_TAG

pytestmark = pytest.mark.k8s

TRITON_BASE = "nvcr.io/nvidia/tritonserver:24.10-py3"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, arguments in _instructions(path):
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments))
    return stages


def _resolve_args(path: Path, reference: str) -> str:
    defaults = dict(
        arguments.split("=", 1)
        for instruction, arguments in _instructions(path)
        if instruction == "ARG" and "=" in arguments
    )
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], reference)


def _from_images(path: Path) -> list[str]:
    stage_names: set[str] = set()
    images = []
    for instruction, arguments in _instructions(path):
        if instruction == "FROM":
            words = arguments.split()
            image = _resolve_args(path, words[0])
            if image not in stage_names:
                images.append(image)
            if len(words) == 3 and words[1].upper() == "AS":
                stage_names.add(words[2])
    return images


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "triton.Dockerfile"])
def test_base_images_are_pinned(dockerfile: str) -> None:
    for image in _from_images(REPO / dockerfile):
        tag = image.rpartition(":")[2]
        assert "@sha256:" in image or PINNED_TAG.match(tag), image


def test_platform_image_runs_only_the_wheel_as_non_root() -> None:
    stages = _stages(REPO / "Dockerfile")
    assert len(stages) >= 2, "multi-stage: build the wheel, then a clean runtime"
    build, runtime = stages[0], stages[-1]
    assert any(i == "RUN" and "pip wheel --no-deps" in a for i, a in build)
    runtime_image = _resolve_args(REPO / "Dockerfile", runtime[0][1].split()[0])
    assert runtime_image.startswith("python:3.11")
    assert "slim" in runtime_image
    # The runtime stage copies no source: it installs the wheel and nothing else.
    assert not [a for i, a in runtime if i in ("COPY", "ADD")]
    installs = [a for i, a in runtime if i == "RUN" and "pip install" in a]
    assert len(installs) == 1
    assert installs[0].rstrip().endswith("/wheels/*.whl")
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "PYTHONSAFEPATH=1" in env
    users = [a for i, a in runtime if i == "USER"]
    assert users
    uid = users[-1].split(":")[0]
    assert uid.isdigit()  # numeric: the kubelet can verify runAsNonRoot
    assert uid != "0"
    assert ("ENTRYPOINT", '["mlp"]') in runtime


def test_triton_image_builds_on_the_pinned_official_image(rendered_all: dict[str, Rendered]) -> None:
    instructions = _instructions(REPO / "triton.Dockerfile")
    assert _from_images(REPO / "triton.Dockerfile") == [TRITON_BASE]
    assert any(i == "COPY" and "triton_models/" in a for i, a in instructions)
    pip = " ".join(a for i, a in instructions if i == "RUN" and "pip install" in a)
    assert "tokenizers==" in pip
    assert "numpy==" in pip
    users = [a for i, a in instructions if i == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")
    # The Triton release in the deployed image tag is the one the Dockerfile builds on.
    release = TRITON_BASE.rpartition(":")[2].removesuffix("-py3")
    for overlay in ("overlays/kind", "overlays/production"):
        (container,) = rendered_all[overlay].one("Deployment", "mlp-triton")["spec"]["template"]["spec"]["containers"]
        assert container["image"].endswith(f"-{release}"), container["image"]


def _pattern(body: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` stays within a path segment, `**/` spans any depth."""
    regex = ""
    i = 0
    while i < len(body):
        if body.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif body[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif body[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(body[i]), i + 1
    return re.compile(regex + r"\Z")


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: a pattern hits a path or any of its parent directories; the last hit wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in patterns:
        negated = line.startswith("!")
        regex = _pattern(line.removeprefix("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_build_context_excludes_secrets_and_tooling() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        "k8s/overlays/kind/secrets/gateway.env",
        "k8s/overlays/kind/data/secrets/rabbitmq-definitions.json",
        "k8s/overlays/kind/data/secrets/redis-auth.conf",
        "k8s/overlays/kind/data/secrets/postgres.env",
        ".env",
        ".venv/bin/python",
        "tests/conftest.py",
        ".git/HEAD",
    ):
        assert _ignored(patterns, path), path
    for path in (
        "pyproject.toml",
        "README.md",
        "platform/mlp/cli.py",
        "events/model.py",
        "triton_models/x/config.pbtxt",
    ):
        assert not _ignored(patterns, path), path


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    return compose


def test_compose_images_are_pinned_and_ports_stay_on_loopback() -> None:
    services = _compose()["services"]
    assert {"rabbitmq", "postgres", "redis", "jaeger"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        tag = image.rpartition(":")[2]
        assert PINNED_TAG.match(tag), f"{name}: {image}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"
    jaeger_ports = {str(p).rsplit(":", 1)[1] for p in services["jaeger"]["ports"]}
    assert {"4317", "4318", "16686"} <= jaeger_ports


def test_compose_and_kind_run_the_same_data_service_images(rendered_all: dict[str, Rendered]) -> None:
    compose_images = {s["image"] for s in _compose()["services"].values()}
    data = rendered_all["overlays/kind/data"]
    kind_images = {
        c["image"]
        for w in data.of_kind("Deployment", "StatefulSet")
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    assert kind_images == compose_images


def _image_uid(dockerfile: str) -> int:
    users = [a for i, a in _instructions(REPO / dockerfile) if i == "USER"]
    return int(users[-1].split(":")[0])


def test_pods_run_as_their_images_own_high_uid(rendered_all: dict[str, Rendered]) -> None:
    """The pod's runAsUser is the image's USER (files the image made for it are its own), and a high
    UID, above the node's own users (checkov CKV_K8S_40)."""
    images = {"inference-platform": _image_uid("Dockerfile"), "triton": _image_uid("triton.Dockerfile")}
    assert all(uid >= 10000 for uid in images.values()), images
    for overlay in ("overlays/kind", "overlays/production"):
        for workload, template in workloads(rendered_all[overlay].objects):
            if namespace_of(workload) != "mlp":
                continue
            (container,) = template["spec"]["containers"]
            expected = images["triton"] if "triton" in container["image"] else images["inference-platform"]
            assert template["spec"]["securityContext"]["runAsUser"] == expected, f"{overlay} {ident(workload)}"
