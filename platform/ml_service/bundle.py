"""The ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel, and what it needs to run.

Recipe (DESIGN.md section 7): the binary finds its shared libraries in ``nvidia_pytriton.libs``;
the Python backend is a folder ``python/`` holding ``libtriton_python.so``,
``triton_python_backend_utils.py`` and the stub for this interpreter's Python version; the stub's
Python finds the virtualenv's packages (numpy, tokenizers) only when that venv's ``bin`` is
first on ``PATH``. The stub embeds a ``libpython3.X``: it must be this interpreter's (found first on
``LD_LIBRARY_PATH``), else it loads the system's, whose older symbols the venv's standard-library
extension modules (``_ssl``, which ``transformers`` imports) do not load against.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

OFFICIAL_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB_NAME = "triton_python_backend_stub"


class LauncherError(Exception):
    """Base of the local Triton launcher's errors."""


class TritonNotSupported(LauncherError):
    """The bundled tritonserver cannot run on this machine (platform, missing wheel or libraries)."""


def docker_hint(model_repository: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002) -> str:
    """The official container serving the same model repository (the reference model needs ``tokenizers``)."""
    return (
        "Run Triton from the official container instead:\n"
        f"  docker run --rm -p {http_port}:8000 -p {grpc_port}:8001 -p {metrics_port}:8002 "
        f'-v "{model_repository}:/models:ro" {OFFICIAL_IMAGE} '
        "bash -c \"pip install --no-cache-dir 'tokenizers>=0.19' && "
        'exec tritonserver --model-repository=/models"'
    )


@dataclass(frozen=True)
class TritonBundle:
    """Paths inside the installed ``nvidia-pytriton`` wheel."""

    binary: Path
    library_dir: Path
    backend_sources: tuple[Path, ...]
    stub: Path

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.binary, *self.backend_sources, self.stub)


def python_version_tag(version: tuple[int, int] | None = None) -> str:
    major, minor = version or sys.version_info[:2]
    return f"{major}.{minor}"


def platform_problem(system: str | None = None, machine: str | None = None) -> str | None:
    """Why the wheel's binary cannot run here, or None (it is built for manylinux x86_64 only)."""
    system = system or platform.system()
    machine = machine or platform.machine()
    if system != "Linux" or machine.lower() not in ("x86_64", "amd64"):
        return f"the bundled tritonserver runs on Linux x86_64 only; this machine is {system} {machine}"
    return None


def find_bundle() -> TritonBundle:
    """Locate the wheel's files without importing pytriton (its import is slow and pulls in much)."""
    problem = platform_problem()
    if problem:
        raise TritonNotSupported(problem)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotSupported(
            "the nvidia-pytriton wheel is not installed (pip install 'inference-platform[triton]')"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    version = python_version_tag()
    bundle = TritonBundle(
        binary=server / "bin" / "tritonserver",
        library_dir=package.parent / "nvidia_pytriton.libs",
        backend_sources=tuple(server / "backends" / "python" / name for name in BACKEND_FILES),
        stub=server / "python_backend_stubs" / version / STUB_NAME,
    )
    missing = [str(p) for p in (*bundle.files, bundle.library_dir) if not p.exists()]
    if missing:
        raise TritonNotSupported(f"the nvidia-pytriton wheel lacks files for Python {version}: " + ", ".join(missing))
    return bundle


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlp" / "triton-backends"


def _fingerprint(paths: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def prepare_backend_dir(bundle: TritonBundle, cache_dir: Path | None = None) -> Path:
    """A ``--backend-directory`` holding ``python/``; built once per wheel and Python version.

    Built in a temporary folder and renamed into place, so concurrent test sessions never see
    a half-copied backend.
    """
    cache = cache_dir or default_cache_dir()
    sources = (*bundle.backend_sources, bundle.stub)
    target = cache / f"py{python_version_tag()}-{_fingerprint(sources)}"
    if (target / "python" / STUB_NAME).exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        (staging / "python").mkdir()
        for source in sources:
            shutil.copy2(source, staging / "python" / source.name)  # copy2 keeps the stub executable
        try:
            staging.rename(target)
        except OSError:
            if not (target / "python" / STUB_NAME).exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def python_library_dir() -> Path | None:
    """The folder of this interpreter's shared ``libpython`` (None for a statically linked Python)."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).is_file():
        return None
    return Path(libdir)


def server_env(
    bundle: TritonBundle,
    base: Mapping[str, str] | None = None,
    python_bin: Path | None = None,
    python_lib: Path | None = None,
) -> dict[str, str]:
    """The environment tritonserver and its Python stubs need."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(python_bin or Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    lib_dir = python_lib or python_library_dir()
    libraries = (str(bundle.library_dir), str(lib_dir) if lib_dir else "", env.get("LD_LIBRARY_PATH", ""))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
    return env


def missing_libraries(bundle: TritonBundle, env: Mapping[str, str]) -> list[str]:
    """Shared libraries the binary or the stub cannot find (``ldd``), e.g. a Python without libpython."""
    if shutil.which("ldd") is None:
        return []
    missing: list[str] = []
    for path in (bundle.binary, bundle.stub):
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=dict(env), timeout=30)
        missing += [f"{path.name}: {line.split()[0]}" for line in out.stdout.splitlines() if "not found" in line]
    return missing
