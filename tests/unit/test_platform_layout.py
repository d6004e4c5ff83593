"""`platform/` is a source folder, never a package: a package of that name shadows the stdlib."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_platform_folder_has_no_init(repo_root: Path) -> None:
    assert (repo_root / "platform" / "carrara" / "__init__.py").exists()
    assert not (repo_root / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_works_from_the_repo_root(repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import platform, carrara; print(platform.system())"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "Linux"
