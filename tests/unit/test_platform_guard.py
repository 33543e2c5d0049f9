"""platform/ is a source root, never a package: `import platform` must stay the standard library's."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_platform_is_the_standard_library_module_from_the_repo_root() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import platform, uuid; print(platform.__file__); print(platform.system())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'platform'}"},
    )
    module_file, system = out.stdout.splitlines()
    assert Path(module_file).parent == Path(sysconfig.get_paths()["stdlib"])
    assert system == "Linux"


def test_platform_folder_has_no_init() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
