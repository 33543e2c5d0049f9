"""Security and operability rules over the rendered YAML of every kustomization.

Each test is one rule of issue 7: pinned images, requests and limits, Pod Security "restricted",
read-only root filesystems with explicit bounded writable volumes, no service-account tokens,
probes, NetworkPolicies (default deny + a policy of its own for every workload), PDBs, and
references that resolve (a Secret, Service port or scale target that does not exist fails here,
not at 2 a.m.).
"""

from __future__ import annotations

import re

import pytest

from tests.k8s.manifests import (
    LONG_RUNNING_KINDS,
    Manifest,
    Rendered,
    containers,
    ident,
    namespace_of,
    selector_matches,
    workloads,
)

pytestmark = pytest.mark.k8s

# A tag that names a release (at least major.minor), or a digest. `redis:7` or `:stable` float.
PINNED_TAG = re.compile(r"^[\w.-]*\d+\.\d+[\w.-]*$")
# Volume types Pod Security "restricted" allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _image_problem(image: str) -> str | None:
    if "@sha256:" in image:
        return None
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return "no tag"
    if tag == "latest":
        return "the tag latest"
    if not PINNED_TAG.match(tag):
        return f"a floating tag {tag!r}"
    return None


def test_images_are_pinned(kustomization: Rendered) -> None:
    problems = [
        f"{ident(w)} {c['name']}: {c['image']} has {problem}"
        for w, template in workloads(kustomization.objects)
        for c in containers(template["spec"])
        if (problem := _image_problem(c["image"]))
    ]
    assert not problems, "\n".join(problems)


def test_every_container_has_requests_and_limits(kustomization: Rendered) -> None:
    problems = [
        f"{ident(w)} {c['name']}: {section}.{resource}"
        for w, template in workloads(kustomization.objects)
        for c in containers(template["spec"])
        for section in ("requests", "limits")
        for resource in ("cpu", "memory")
        if resource not in c.get("resources", {}).get(section, {})
    ]
    assert not problems, "missing:\n" + "\n".join(problems)


def _restricted_problems(workload: Manifest, pod: Manifest) -> list[str]:
    """Pod Security Standard "restricted", plus a read-only root filesystem."""
    where = ident(workload)
    problems = [f"{where}: {field}" for field in ("hostNetwork", "hostPID", "hostIPC") if pod.get(field)]
    pod_context = pod.get("securityContext", {})
    if pod_context.get("runAsUser") == 0:
        problems.append(f"{where}: pod runAsUser 0")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"{where}: volume {volume['name']} of type {kinds}")
    for c in containers(pod):
        at = f"{where} {c['name']}"
        context = c.get("securityContext", {})
        non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        capabilities = context.get("capabilities", {})
        if non_root is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        if context.get("runAsUser") == 0:
            problems.append(f"{at}: runAsUser 0")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{at}: seccompProfile {seccomp}")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            problems.append(f"{at}: privileged")
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{at}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{at}: adds capabilities {capabilities['add']}")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: root filesystem is writable")
        if any("hostPort" in port for port in c.get("ports", [])):
            problems.append(f"{at}: hostPort")
    return problems


def test_pods_meet_pod_security_restricted_with_a_read_only_root(kustomization: Rendered) -> None:
    problems = [
        problem
        for workload, template in workloads(kustomization.objects)
        for problem in _restricted_problems(workload, template["spec"])
    ]
    assert not problems, "\n".join(problems)


def test_namespaces_enforce_pod_security_restricted(kustomization: Rendered) -> None:
    namespaces = kustomization.of_kind("Namespace")
    assert namespaces
    for ns in namespaces:
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted", ident(ns)


def test_writable_volumes_are_explicit_and_bounded(kustomization: Rendered) -> None:
    """Each emptyDir is mounted and has a size limit (a runaway writer cannot fill the node)."""
    for workload, template in workloads(kustomization.objects):
        pod = template["spec"]
        mounted = {m["name"] for c in containers(pod) for m in c.get("volumeMounts", [])}
        for volume in pod.get("volumes", []):
            assert volume["name"] in mounted, f"{ident(workload)}: volume {volume['name']} unused"
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{ident(workload)}: {volume['name']} unbounded"


def test_service_account_tokens_are_not_mounted(kustomization: Rendered) -> None:
    accounts = {(namespace_of(sa), sa["metadata"]["name"]): sa for sa in kustomization.of_kind("ServiceAccount")}
    for sa in accounts.values():
        assert sa.get("automountServiceAccountToken") is False, ident(sa)
    for workload, template in workloads(kustomization.objects):
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, ident(workload)
        # Each workload has an account of its own (never `default`), defined alongside it.
        account = pod.get("serviceAccountName")
        assert (namespace_of(workload), account) in accounts, f"{ident(workload)}: account {account}"


def test_long_running_containers_have_probes(kustomization: Rendered) -> None:
    problems = [
        f"{ident(w)} {c['name']}: no {probe}"
        for w, template in workloads(kustomization.objects)
        if w["kind"] in LONG_RUNNING_KINDS
        for c in template["spec"]["containers"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        if probe not in c
    ]
    assert not problems, "\n".join(problems)


def _policies(rendered: Rendered, namespace: str | None) -> list[Manifest]:
    return [p for p in rendered.of_kind("NetworkPolicy") if namespace_of(p) == namespace]


def test_every_namespace_with_workloads_denies_by_default(kustomization: Rendered) -> None:
    for namespace in {namespace_of(w) for w, _ in workloads(kustomization.objects)}:
        deny = [
            p
            for p in _policies(kustomization, namespace)
            if p["spec"]["podSelector"] == {}
            and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
        ]
        assert deny, f"namespace {namespace} has no default-deny NetworkPolicy"


def test_every_workload_has_a_network_policy_of_its_own(kustomization: Rendered) -> None:
    """Beyond the namespace-wide deny and DNS rules: a policy that names the workload's pods."""
    for workload, template in workloads(kustomization.objects):
        labels = template["metadata"].get("labels", {})
        own = [
            p
            for p in _policies(kustomization, namespace_of(workload))
            if p["spec"]["podSelector"] and selector_matches(p["spec"]["podSelector"], labels)
        ]
        assert own, f"{ident(workload)} is selected by no NetworkPolicy of its own"


def _container_port(pod: Manifest, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for c in pod["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == port:
                number: int = p["containerPort"]
                return number
    return None


def test_every_service_port_is_allowed_in_by_a_network_policy(kustomization: Rendered) -> None:
    """Default deny must not silently cut a Service off: each of its ports has an ingress rule."""
    pods = [(w, t) for w, t in workloads(kustomization.objects) if w["kind"] in LONG_RUNNING_KINDS]
    for service in kustomization.of_kind("Service"):
        namespace = namespace_of(service)
        backends = [
            t
            for w, t in pods
            if namespace_of(w) == namespace
            and selector_matches({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"])
        ]
        assert backends, f"{ident(service)} selects no pods"
        for template in backends:
            labels = template["metadata"]["labels"]
            allowed: set[int] = set()
            for policy in _policies(kustomization, namespace):
                if not selector_matches(policy["spec"]["podSelector"], labels):
                    continue
                for rule in policy["spec"].get("ingress", []):
                    for port in rule.get("ports", []):
                        number = _container_port(template["spec"], port["port"])
                        if number is not None:
                            allowed.add(number)
            for port in service["spec"]["ports"]:
                target = _container_port(template["spec"], port.get("targetPort", port["port"]))
                assert target in allowed, f"{ident(service)} port {port['port']}: no ingress rule"


def _scaled_objects_by_target(rendered: Rendered) -> dict[tuple[str | None, str], Manifest]:
    return {(namespace_of(so), so["spec"]["scaleTargetRef"]["name"]): so for so in rendered.of_kind("ScaledObject")}


def test_autoscaled_deployments_leave_the_replica_count_to_keda(kustomization: Rendered) -> None:
    # A fixed `replicas` would reset the HPA's count on every `kubectl apply`.
    scaled = _scaled_objects_by_target(kustomization)
    for deployment in kustomization.of_kind("Deployment"):
        if (namespace_of(deployment), deployment["metadata"]["name"]) in scaled:
            assert "replicas" not in deployment["spec"], ident(deployment)


def test_replicated_workloads_have_a_disruption_budget(kustomization: Rendered) -> None:
    scaled = _scaled_objects_by_target(kustomization)
    budgets = kustomization.of_kind("PodDisruptionBudget")
    for workload in kustomization.of_kind("Deployment", "StatefulSet"):
        key = (namespace_of(workload), workload["metadata"]["name"])
        autoscaled_minimum = scaled[key]["spec"].get("minReplicaCount", 1) if key in scaled else 1
        minimum = max(workload["spec"].get("replicas", 1), autoscaled_minimum)
        if minimum <= 1:
            continue
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if namespace_of(b) == key[0] and selector_matches(b["spec"]["selector"], labels)]
        assert covering, f"{ident(workload)} runs {minimum} replicas without a PodDisruptionBudget"


def test_disruption_budgets_select_a_workload(kustomization: Rendered) -> None:
    templates = [(namespace_of(w), t["metadata"]["labels"]) for w, t in workloads(kustomization.objects)]
    for budget in kustomization.of_kind("PodDisruptionBudget"):
        assert any(
            ns == namespace_of(budget) and selector_matches(budget["spec"]["selector"], labels)
            for ns, labels in templates
        ), ident(budget)
        # maxUnavailable keeps single-replica workloads drainable (minAvailable: 1 would block a drain).
        assert "maxUnavailable" in budget["spec"], ident(budget)


def test_references_resolve(overlay: Rendered) -> None:
    """ConfigMaps, Secrets, accounts, scale targets and Ingress backends named anywhere exist."""
    names = {(o["kind"], namespace_of(o), o["metadata"]["name"]) for o in overlay.objects}
    missing: list[str] = []

    def need(kind: str, namespace: str | None, name: str, by: Manifest) -> None:
        if (kind, namespace, name) not in names:
            missing.append(f"{ident(by)} -> {kind}/{name}")

    for workload, template in workloads(overlay.objects):
        ns = namespace_of(workload)
        pod = template["spec"]
        for c in containers(pod):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    need("ConfigMap", ns, source["configMapRef"]["name"], workload)
                if "secretRef" in source:
                    need("Secret", ns, source["secretRef"]["name"], workload)
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    need("Secret", ns, ref["secretKeyRef"]["name"], workload)
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ns, ref["configMapKeyRef"]["name"], workload)
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                need("ConfigMap", ns, volume["configMap"]["name"], workload)
            if "secret" in volume:
                need("Secret", ns, volume["secret"]["secretName"], workload)
    for so in overlay.of_kind("ScaledObject"):
        need("Deployment", namespace_of(so), so["spec"]["scaleTargetRef"]["name"], so)
        for trigger in so["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                need("TriggerAuthentication", namespace_of(so), trigger["authenticationRef"]["name"], so)
    for auth in overlay.of_kind("TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            need("Secret", namespace_of(auth), ref["name"], auth)
    for ingress in overlay.of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                need("Service", namespace_of(ingress), backend["name"], ingress)
                service = overlay.get("Service", backend["name"], namespace_of(ingress))
                port_names = {p.get("name") for p in service["spec"]["ports"]} if service else set()
                if service is not None and backend["port"].get("name") not in port_names:
                    missing.append(f"{ident(ingress)} -> {backend['name']} port {backend['port']}")
    assert not missing, "\n".join(missing)


def test_stateful_services_keep_their_state_on_persistent_volumes(kustomization: Rendered) -> None:
    for statefulset in kustomization.of_kind("StatefulSet"):
        claims = {c["metadata"]["name"] for c in statefulset["spec"].get("volumeClaimTemplates", [])}
        assert claims, f"{ident(statefulset)} keeps its state in the pod"
        mounted = {m["name"] for c in statefulset["spec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]}
        assert claims <= mounted, ident(statefulset)
