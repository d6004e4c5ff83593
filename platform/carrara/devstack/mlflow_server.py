"""The MLflow tracking server: Postgres backend store, artifacts over HTTP (`--serve-artifacts`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx

from carrara.devstack.processes import LaunchSpec
from carrara.devstack.service import Service, StackError


class MlflowService(Service):
    name = "mlflow"
    label = "MLflow"

    @property
    def port(self) -> int:
        return self.settings.mlflow_port

    @property
    def endpoint(self) -> str:
        return self.settings.mlflow_url

    def _mlflow_bin(self) -> str:
        beside_python = Path(sys.executable).parent / "mlflow"
        if beside_python.exists():
            return str(beside_python)
        found = shutil.which("mlflow")
        if found is None:
            raise StackError("mlflow is not installed: run `make bootstrap` (PyPI package)")
        return found

    def prepare(self) -> None:
        self._mlflow_bin()
        (self.home / "artifacts").mkdir(parents=True, exist_ok=True)

    def launch_spec(self) -> LaunchSpec:
        s = self.settings
        return LaunchSpec(
            argv=[
                self._mlflow_bin(),
                "server",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.home / "artifacts"),
                "--host",
                s.host,
                "--port",
                str(self.port),
                "--workers",
                "2",
            ],
            cwd=self.home,
            # Passed by environment, not argv, so the password never shows in `ps`.
            env={"MLFLOW_BACKEND_STORE_URI": s.mlflow_database_url},
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
