"""The model registry is the one model list: the Kubernetes base, Triton's model repository, the
settings and the AsyncAPI document agree with it (events/registry.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from events.registry import DEFAULT_MODELS, QUICKSTART_MODELS, REGISTRY, ModelSpec, Tensor
from events.topology import requests_queue
from mlp.settings import Settings
from ops import k8s
from tests.k8s.manifests import REPO, Rendered, env_value

pytestmark = pytest.mark.k8s

TRITON_MODELS = REPO / "triton_models"
_DATATYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32"}


def test_the_committed_workers_are_the_generated_ones_and_the_base_lists_agree() -> None:
    assert k8s.problems(REPO / k8s.BASE) == []
    assert k8s.main(["check", "--base", str(REPO / k8s.BASE)]) == 0


def test_a_changed_pool_or_a_stale_worker_is_caught(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for name in ("kustomization.yaml", "triton.yaml", *k8s.generated()):
        (base / name).write_text((REPO / k8s.BASE / name).read_text(encoding="utf-8"), encoding="utf-8")
    worker = base / k8s.worker_file("all-minilm-l6-v2")
    worker.write_text(worker.read_text(encoding="utf-8").replace("maxReplicaCount: 10", "maxReplicaCount: 11"))
    (base / "worker-gone-model.yaml").write_text("# left behind\n")
    found = k8s.problems(base)
    assert any("worker-all-minilm-l6-v2.yaml is not the generated file" in p for p in found)
    assert any("worker-gone-model.yaml serves a model the registry does not deploy" in p for p in found)
    assert k8s.write(base) == [worker]
    assert len(k8s.problems(base)) == 1  # the stale file is the operator's to remove


def test_each_deployed_model_has_its_worker_on_its_queue(overlay: Rendered) -> None:
    for name in QUICKSTART_MODELS:
        spec = REGISTRY[name]
        deployment = overlay.one("Deployment", f"mlp-worker-{name}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert env_value(container, "MLP_MODELS") == name
        scaled = overlay.one("ScaledObject", f"mlp-worker-{name}")
        (rabbitmq,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "rabbitmq"]
        assert rabbitmq["metadata"]["queueName"] == spec.queue == requests_queue(name).name
        assert rabbitmq["metadata"]["value"] == str(spec.pool.queue_length_target)


def test_settings_name_registry_entries() -> None:
    assert set(DEFAULT_MODELS) <= set(QUICKSTART_MODELS) <= set(REGISTRY)
    assert Settings.model_validate({}).models == DEFAULT_MODELS
    assert Settings.model_validate({"models": ",".join(QUICKSTART_MODELS)}).models == QUICKSTART_MODELS
    with pytest.raises(ValueError, match="not in the model registry"):
        Settings.model_validate({"models": "basic-model,no-such-model"})


def _config(spec: ModelSpec, name: str = "config.pbtxt") -> str:
    return (TRITON_MODELS / spec.triton_name / name).read_text(encoding="utf-8")


def _declared(config: str, section: str) -> list[dict[str, Any]]:
    """The tensors of an ``input [...]`` / ``output [...]`` block of a config.pbtxt."""
    block = re.search(rf"^{section} \[(.*?)^\]", config, flags=re.MULTILINE | re.DOTALL)
    assert block, section
    tensors = []
    for body in re.findall(r"\{(.*?)\}", block.group(1), flags=re.DOTALL):
        dims = re.search(r"dims: \[([^\]]*)\]", body)
        assert dims
        tensors.append(
            {
                "name": re.search(r'name: "([^"]+)"', body).group(1),  # type: ignore[union-attr]
                "data_type": re.search(r"data_type: (\w+)", body).group(1),  # type: ignore[union-attr]
                "dims": tuple(int(d) for d in dims.group(1).split(",")),
                "optional": "optional: true" in body,
            }
        )
    return tensors


def _expected(tensors: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "data_type": _DATATYPES[t.datatype], "dims": t.dims, "optional": t.optional} for t in tensors
    ]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_entry_is_a_triton_model_with_the_registrys_contract(name: str) -> None:
    spec = REGISTRY[name]
    configs = [
        "config.pbtxt",
        *(
            p.relative_to(TRITON_MODELS / spec.triton_name).as_posix()
            for p in sorted((TRITON_MODELS / spec.triton_name / "configs").glob("*.pbtxt"))
        ),
    ]
    for config_name in configs:
        config = _config(spec, config_name)
        assert f'name: "{spec.triton_name}"' in config
        assert f"max_batch_size: {spec.max_batch_size}\n" in config, config_name
        assert _declared(config, "input") == _expected(spec.contract.inputs), config_name
        assert _declared(config, "output") == _expected(spec.contract.outputs), config_name
    if spec.max_input_tokens is not None:
        assert f'key: "max_input_tokens" value: {{ string_value: "{spec.max_input_tokens}" }}' in _config(spec)
    assert (TRITON_MODELS / spec.tokenizer.file).is_file()


def test_the_gpu_config_is_served_in_production_and_runs_on_a_gpu(rendered_all: dict[str, Rendered]) -> None:
    gpu = _config(REGISTRY["all-minilm-l6-v2"], "configs/gpu.pbtxt")
    assert "kind: KIND_GPU" in gpu
    assert "kind: KIND_GPU" not in _config(REGISTRY["all-minilm-l6-v2"])
    production = rendered_all["overlays/production"]
    (container,) = production.one("Deployment", "mlp-triton")["spec"]["template"]["spec"]["containers"]
    assert "--model-config-name=gpu" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (kind,) = rendered_all["overlays/kind"].one("Deployment", "mlp-triton")["spec"]["template"]["spec"]["containers"]
    assert "--model-config-name=gpu" not in kind["args"]


@pytest.mark.parametrize("overlay_name", ["overlays/kind", "overlays/production"])
def test_triton_traces_to_the_platforms_collector(rendered_all: dict[str, Rendered], overlay_name: str) -> None:
    rendered = rendered_all[overlay_name]
    (container,) = rendered.one("Deployment", "mlp-triton")["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--trace-config=mode=opentelemetry" in args
    assert "--trace-config=opentelemetry,url=$(OTEL_EXPORTER_OTLP_ENDPOINT)/v1/traces" in args
    (variable,) = [e for e in container["env"] if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"]
    config = variable["valueFrom"]["configMapKeyRef"]
    (config_map,) = [m for m in rendered.of_kind("ConfigMap") if m["metadata"]["name"] == config["name"]]
    assert config_map["data"][config["key"]].startswith("http")


def test_the_asyncapi_document_names_the_registry_models() -> None:
    document = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text(encoding="utf-8"))
    for channel in document["channels"].values():
        assert channel["parameters"]["model"]["enum"] == sorted(REGISTRY)
    completed = document["components"]["schemas"]["InferenceCompleted"]["properties"]
    assert "embedding" in completed
