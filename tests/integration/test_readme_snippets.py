"""The README's copy-pasteable snippets (fenced as ```bash tested) run against a live API."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.integration.conftest import ROOT, LiveApi

SNIPPET = re.compile(r"^```bash tested\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _snippets() -> list[str]:
    return SNIPPET.findall((ROOT / "README.md").read_text())


def test_the_readme_has_tested_snippets() -> None:
    assert len(_snippets()) >= 1


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index: int, live_api: LiveApi) -> None:
    script = _snippets()[index]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env={**os.environ, **live_api.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr
    if "runs/algorithms" in script:
        assert '"logistic_regression"' in result.stdout
    if "tokens create" in script:
        assert "crr_" in result.stdout
