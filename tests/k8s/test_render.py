"""Every kustomization renders, and every rendered object is valid for the API server that will get it:
Kubernetes objects against the Kubernetes JSON schemas (strict: unknown fields are errors), KEDA
objects against KEDA's own CRD schemas (copied under tests/k8s/schemas)."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.k8s.manifests import Manifest, Rendered, closed_schema, ident, load_crd_schema, namespace_of

pytestmark = pytest.mark.k8s

# The oldest Kubernetes minor still supported upstream, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.32", str(kubernetes_validate.latest_version()))

KEDA_SCHEMAS = {
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PriorityClass"}


def _keda_validators() -> dict[str, Any]:
    return {
        kind: jsonschema.Draft202012Validator(closed_schema(load_crd_schema(filename)))
        for kind, filename in KEDA_SCHEMAS.items()
    }


KEDA_VALIDATORS = _keda_validators()


def _kubernetes_errors(obj: Manifest, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        return [f"{ident(obj)}: {path}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{ident(obj)}: no schema ({error.message})"]
    return []


def _keda_errors(obj: Manifest) -> list[str]:
    validator = KEDA_VALIDATORS[obj["kind"]]
    return [
        f"{ident(obj)}: {'.'.join(str(p) for p in error.path)}: {error.message}" for error in validator.iter_errors(obj)
    ]


def test_every_kustomization_renders_unique_named_objects(kustomization: Rendered) -> None:
    assert kustomization.objects, f"{kustomization.name} rendered nothing"
    for obj in kustomization.objects:
        assert obj.get("apiVersion"), obj
        assert obj.get("kind"), obj
        assert obj["metadata"].get("name"), obj
    duplicates = [key for key, n in Counter(ident(o) for o in kustomization.objects).items() if n > 1]
    assert not duplicates


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_validate_strictly(kustomization: Rendered, version: str) -> None:
    errors = [
        message
        for obj in kustomization.objects
        if obj["kind"] not in KEDA_SCHEMAS
        for message in _kubernetes_errors(obj, version)
    ]
    assert not errors, "\n".join(errors)


def test_keda_objects_validate_against_the_crd_schemas(kustomization: Rendered) -> None:
    keda = kustomization.of_kind(*KEDA_SCHEMAS)
    errors = [message for obj in keda for message in _keda_errors(obj)]
    assert not errors, "\n".join(errors)
    for obj in keda:
        assert obj["apiVersion"] == "keda.sh/v1alpha1", ident(obj)


def test_scaled_objects_respect_the_crd_rule_min_le_max(kustomization: Rendered) -> None:
    # The CRD states this as a CEL rule (x-kubernetes-validations), which JSON schema cannot run.
    for obj in kustomization.of_kind("ScaledObject"):
        spec = obj["spec"]
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), ident(obj)


def test_the_validators_reject_a_misspelt_field(rendered_all: dict[str, Rendered]) -> None:
    """Guards the two tests above: a typo must fail, not be accepted as an unknown extra."""
    kind = rendered_all["overlays/kind"]
    deployment = copy.deepcopy(kind.one("Deployment", "mlp-gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert _kubernetes_errors(deployment, KUBERNETES_VERSIONS[-1])

    scaled = copy.deepcopy(kind.one("ScaledObject", "mlp-worker-basic-model"))
    scaled["spec"]["minReplicas"] = 1
    assert _keda_errors(scaled)
    scaled = copy.deepcopy(kind.one("ScaledObject", "mlp-worker-basic-model"))
    scaled["spec"]["triggers"][0]["metadata"]["value"] = 100  # metadata values are strings
    assert _keda_errors(scaled)


def test_namespaced_objects_name_their_namespace(overlay: Rendered) -> None:
    # Without one, `kubectl apply -k` would put the object into the context's current namespace.
    missing = [ident(o) for o in overlay.objects if o["kind"] not in CLUSTER_SCOPED and not namespace_of(o)]
    assert not missing
    namespaces = {o["metadata"]["name"] for o in overlay.of_kind("Namespace")}
    used = {namespace_of(o) for o in overlay.objects if o["kind"] not in CLUSTER_SCOPED}
    assert used <= namespaces, f"namespaces used but not created: {used - namespaces}"
