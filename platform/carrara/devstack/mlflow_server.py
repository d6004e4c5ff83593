"""The MLflow tracking server: Postgres backend store, artifacts over HTTP (`--serve-artifacts`).

Secured (`carrara stack up --secure`): MLflow's built-in authentication (`--app-name basic-auth`).
Its config (`basic_auth.ini`, mode 0600) sets `default_permission = READ` and a generated admin
password; the user store is SQLite under the service's home. Once it answers, the admin creates
Carrara's service account `carrara` (it creates experiments and registered models, and so manages
them) and the scorers' `carrara-scorer` (read only: the default permission). Requests without
credentials get 401.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx

from carrara.devstack.processes import LaunchSpec
from carrara.devstack.secure import MLFLOW_ACCOUNTS, MLFLOW_ADMIN, SecureMaterial, write_private
from carrara.devstack.service import Service, StackError
from carrara.settings import Settings


class MlflowService(Service):
    name = "mlflow"
    label = "MLflow"

    def __init__(self, settings: Settings, secure: SecureMaterial | None = None) -> None:
        super().__init__(settings)
        self.secure = secure
        if secure is not None:
            self.label = "MLflow (basic auth)"

    @property
    def auth_config(self) -> Path:
        return self.home / "basic_auth.ini"

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
        if self.secure is not None:
            write_private(
                self.auth_config,
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = sqlite:///{self.home / 'basic_auth.db'}\n"
                f"admin_username = {MLFLOW_ADMIN}\n"
                f"admin_password = {self.secure.password(f'mlflow:{MLFLOW_ADMIN}')}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
            )

    def launch_spec(self) -> LaunchSpec:
        s = self.settings
        # Passed by environment, not argv, so the password never shows in `ps`.
        env = {"MLFLOW_BACKEND_STORE_URI": s.mlflow_database_url}
        auth: list[str] = []
        if self.secure is not None:
            auth = ["--app-name", "basic-auth"]
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = self.secure.password("mlflow:flask-secret")
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
                *auth,
            ],
            cwd=self.home,
            env=env,
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def after_healthy(self) -> None:
        """Secured: create Carrara's accounts (idempotent)."""
        if self.secure is None:
            return
        admin = (MLFLOW_ADMIN, self.secure.password(f"mlflow:{MLFLOW_ADMIN}"))
        for account in MLFLOW_ACCOUNTS.values():
            response = httpx.post(
                f"{self.endpoint}/api/2.0/mlflow/users/create",
                json={"username": account, "password": self.secure.password(f"mlflow:{account}")},
                auth=admin,
                timeout=30,
            )
            if response.is_success or "RESOURCE_ALREADY_EXISTS" in response.text:
                continue
            raise StackError(
                f"MLflow refused to create the account {account!r}: "
                f"HTTP {response.status_code} {response.text[:300]}"
            )
