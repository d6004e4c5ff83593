"""The lockfiles pin every dependency of pyproject.toml, with hashes, above the CVE floors.

A dependency added to pyproject.toml without `make lock` fails here (and the bootstrap, which
installs from the lock only, would not install it).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^ ;\\]+)", re.MULTILINE)


def pins(lock: Path) -> dict[str, list[Version]]:
    """Package -> the versions pinned (a universal lock may pin one per platform)."""
    found: dict[str, list[Version]] = {}
    for match in _PIN.finditer(lock.read_text()):
        found.setdefault(canonicalize_name(match["name"]), []).append(Version(match["version"]))
    return found


def requirements(repo_root: Path, extra: str | None) -> list[Requirement]:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    if extra:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize(
    ("lock", "extra"), [("requirements.lock", None), ("requirements-dev.lock", "dev")]
)
def test_every_dependency_is_locked_within_its_specifier(
    repo_root: Path, lock: str, extra: str | None
) -> None:
    locked = pins(repo_root / lock)
    problems = []
    for req in requirements(repo_root, extra):
        versions = locked.get(canonicalize_name(req.name))
        if not versions:
            problems.append(f"{req.name} is not in {lock}")
        elif not all(req.specifier.contains(v, prereleases=True) for v in versions):
            problems.append(f"{req.name} {versions} does not satisfy {req.specifier}")
    assert problems == [], "run `make lock`: " + "; ".join(problems)


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-dev.lock"])
def test_every_pin_has_hashes(repo_root: Path, lock: str) -> None:
    text = (repo_root / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    unhashed = [e.split(" ", 1)[0] for e in entries if "==" in e and "--hash=sha256:" not in e]
    assert unhashed == []


@pytest.mark.parametrize(
    ("package", "vulnerable", "floor"),
    [
        ("starlette", "0.49.0", "0.49.1"),
        ("python-multipart", "0.0.17", "0.0.18"),
        ("lightgbm", "4.5.0", "4.6.0"),
        ("jinja2", "3.1.5", "3.1.6"),
        ("mlflow", "3.0.1", "3.1"),
    ],
)
def test_releases_with_published_cves_are_excluded(
    repo_root: Path, package: str, vulnerable: str, floor: str
) -> None:
    reqs = {canonicalize_name(r.name): r for r in requirements(repo_root, None)}
    assert not reqs[package].specifier.contains(Version(vulnerable))
    assert min(pins(repo_root / "requirements.lock")[package]) >= Version(floor)
