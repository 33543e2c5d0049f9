"""The launcher's pure parts, the backend directory cache, and refusals that need no server."""

from __future__ import annotations

import os
import stat
import sys
import sysconfig
from pathlib import Path

import pytest

from ml_service.bundle import (
    OFFICIAL_IMAGE,
    STUB_NAME,
    TritonBundle,
    TritonNotSupported,
    docker_hint,
    find_bundle,
    platform_problem,
    prepare_backend_dir,
    python_library_dir,
    server_env,
)
from ml_service.launcher import (
    LauncherError,
    ServerOptions,
    TraceOptions,
    TritonPorts,
    TritonProcess,
    check_options,
    default_model_repository,
    server_command,
    trace_options_from_env,
)
from ops.triton import main

ROOT = Path(__file__).resolve().parents[2]


def test_default_model_repository_is_the_repositorys_triton_models() -> None:
    repo = default_model_repository()
    assert repo == ROOT / "triton_models"
    assert (repo / "basic-model" / "config.pbtxt").is_file()
    assert (repo / "slow-model" / "config.pbtxt").is_file()


def test_command_sets_ports_addresses_and_explicit_models() -> None:
    options = ServerOptions(
        model_repository=Path("/models"), ports=TritonPorts(9000, 9001, 9002), models=("basic-model",)
    )
    command = server_command(Path("/bin/tritonserver"), Path("/backends"), options)
    assert command[0] == "/bin/tritonserver"
    for flag in (
        "--model-repository=/models",
        "--backend-directory=/backends",
        "--http-port=9000",
        "--grpc-port=9001",
        "--metrics-port=9002",
        "--grpc-address=127.0.0.1",
        "--model-control-mode=explicit",
        "--load-model=basic-model",
    ):
        assert flag in command
    all_models = server_command(Path("/t"), Path("/b"), ServerOptions(model_repository=Path("/m")))
    assert not any(arg.startswith(("--model-control-mode", "--load-model")) for arg in all_models)


def test_unknown_or_unsafe_model_names_are_refused() -> None:
    for name in ("nope", "../etc", "basic-model/1"):
        with pytest.raises(LauncherError, match="not in"):
            check_options(ServerOptions(models=(name,)))
    with pytest.raises(LauncherError, match="does not exist"):
        check_options(ServerOptions(model_repository=Path("/nonexistent/models")))


def test_env_puts_the_venv_first_on_path_and_the_wheel_libraries_on_the_loader_path() -> None:
    bundle = TritonBundle(Path("/w/bin/tritonserver"), Path("/w/libs"), (), Path("/w/stub"))
    env = server_env(
        bundle,
        {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"},
        python_bin=Path("/venv/bin"),
        python_lib=Path("/py/lib"),
    )
    assert env["PATH"] == os.pathsep.join(["/venv/bin", "/usr/bin"])
    # The stub embeds libpython: this interpreter's comes before any other (the system's).
    assert env["LD_LIBRARY_PATH"] == os.pathsep.join(["/w/libs", "/py/lib", "/opt/lib"])


def test_this_interpreters_libpython_is_found_when_it_is_shared() -> None:
    found = python_library_dir()
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert found is not None
        assert (found / sysconfig.get_config_var("INSTSONAME")).is_file()
    else:
        assert found is None


def test_triton_traces_with_opentelemetry_when_an_otlp_endpoint_is_set() -> None:
    assert trace_options_from_env({}) is None
    assert trace_options_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4318", "OTEL_SDK_DISABLED": "true"}) is None
    base = trace_options_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4318/"})
    assert base == TraceOptions(endpoint="http://j:4318/v1/traces")
    own = trace_options_from_env(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    )
    assert own == TraceOptions(endpoint="http://c:4318/v1/traces", export_delay_ms=100)
    command = server_command(
        Path("/b/tritonserver"), Path("/backends"), ServerOptions(model_repository=Path("/models"), trace=own)
    )
    assert "--trace-config=mode=opentelemetry" in command
    assert "--trace-config=opentelemetry,url=http://c:4318/v1/traces" in command
    assert "--trace-config=rate=1" in command


def test_other_platforms_are_named_and_pointed_to_the_official_container() -> None:
    assert platform_problem("Linux", "x86_64") is None
    problem = platform_problem("Darwin", "arm64")
    assert problem is not None
    assert "Darwin arm64" in problem
    hint = docker_hint(Path("/repo/triton_models"), 18000, 18001, 18002)
    assert OFFICIAL_IMAGE == "nvcr.io/nvidia/tritonserver:24.10-py3"
    ports = "-p 18000:8000 -p 18001:8001 -p 18002:8002"
    assert f'docker run --rm {ports} -v "/repo/triton_models:/models:ro" {OFFICIAL_IMAGE}' in hint
    assert "tritonserver --model-repository=/models" in hint


def test_backend_dir_is_built_once_with_an_executable_stub(tmp_path: Path) -> None:
    bundle = find_bundle()
    first = prepare_backend_dir(bundle, tmp_path)
    python = first / "python"
    assert sorted(p.name for p in python.iterdir()) == sorted(
        ["libtriton_python.so", "triton_python_backend_utils.py", STUB_NAME]
    )
    assert os.stat(python / STUB_NAME).st_mode & stat.S_IXUSR
    assert f"py{sys.version_info.major}.{sys.version_info.minor}-" in first.name
    assert prepare_backend_dir(bundle, tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folders left


def test_a_binary_that_cannot_execute_is_reported_as_not_supported(tmp_path: Path) -> None:
    real = find_bundle()
    broken = tmp_path / "tritonserver"
    broken.write_bytes(b"\x7fELF but not really")
    broken.chmod(0o755)
    bundle = TritonBundle(broken, real.library_dir, real.backend_sources, real.stub)
    server = TritonProcess(ServerOptions(), bundle=bundle, cache_dir=tmp_path / "cache")
    with pytest.raises(TritonNotSupported, match="cannot execute"):
        server.start()
    assert not server.running()


def test_cli_refuses_an_unknown_model_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", "no-such-model", "--http-port", "1", "--grpc-port", "2", "--metrics-port", "3"]) == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err
    assert OFFICIAL_IMAGE in err
