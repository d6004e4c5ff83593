"""PostgreSQL from Debian's package, run as a private cluster of this project.

The cluster lives under `.carrara/postgres` and listens on TCP only (no shared socket directory), so
it never interferes with a system cluster. PostgreSQL refuses to run as root: when we are root the
server runs as the `postgres` user that the Debian package creates.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

from carrara.devstack.processes import LaunchSpec
from carrara.devstack.service import Service, StackError

SYSTEM_USER = "postgres"


def find_pg_bin() -> Path:
    """The newest installed server's bin directory (/usr/lib/postgresql/<major>/bin)."""
    override = os.environ.get("CARRARA_PG_BIN")
    if override:
        return Path(override)
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise StackError("PostgreSQL is not installed: run `deploy/bootstrap.sh` (apt package)")
    return versions[-1]


class PostgresService(Service):
    name = "postgres"
    label = "PostgreSQL"

    @property
    def port(self) -> int:
        return self.settings.pg_port

    @property
    def endpoint(self) -> str:
        s = self.settings
        return f"postgresql://{s.db_user}@{s.host}:{self.port}/{s.db_name}"

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def prepare(self) -> None:
        bin_dir = find_pg_bin()
        self.home.parent.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            self._make_reachable_by_postgres_user()
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.home / ".initdb-pw"
        pwfile.write_text(self.settings.db_password + "\n")
        pwfile.chmod(0o600)
        if self.as_root:
            shutil.chown(self.data_dir, SYSTEM_USER, SYSTEM_USER)
            shutil.chown(pwfile, SYSTEM_USER, SYSTEM_USER)
        try:
            result = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.settings.db_user,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "--encoding=UTF8",
                    "--no-locale",
                ],
                capture_output=True,
                text=True,
                user=SYSTEM_USER if self.as_root else None,
                check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise StackError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _make_reachable_by_postgres_user(self) -> None:
        """Place the cluster where the `postgres` user can reach it.

        When the checkout sits below a directory closed to other users (e.g. /root), the cluster is
        kept in /var/lib/carrara/<hash of the checkout> and `.carrara/postgres` links to it.
        """
        if self.home.is_symlink() or self.home.exists():
            return
        probe = subprocess.run(["test", "-w", str(self.home.parent)], user=SYSTEM_USER, check=False)
        if probe.returncode == 0:
            self.home.mkdir()
            shutil.chown(self.home, SYSTEM_USER, SYSTEM_USER)
            return
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:16]
        target = Path("/var/lib/carrara") / digest / "postgres"
        target.mkdir(parents=True, exist_ok=True)
        shutil.chown(target, SYSTEM_USER, SYSTEM_USER)
        self.home.symlink_to(target, target_is_directory=True)

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(
            argv=[
                str(find_pg_bin() / "postgres"),
                "-D",
                str(self.data_dir),
                "-c",
                f"listen_addresses={self.settings.host}",
                "-c",
                f"port={self.port}",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=300",
            ],
            cwd=self.data_dir,
            user=SYSTEM_USER if self.as_root else None,
            # SIGINT is PostgreSQL's "fast shutdown"; SIGTERM would wait for every client to leave.
            stop_signal=signal.SIGINT,
        )

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        s = self.settings
        return psycopg.connect(
            host=s.host,
            port=self.port,
            user=s.db_user,
            password=s.db_password,
            dbname=dbname,
            connect_timeout=2,
            autocommit=True,
        )

    def healthy(self) -> bool:
        try:
            with self.connect() as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def after_healthy(self) -> None:
        """Create the control plane's and MLflow's databases and MLflow's role if missing."""
        s = self.settings
        with self.connect() as conn:
            role_exists = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (s.mlflow_db_user,)
            ).fetchone()
            if not role_exists:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(s.mlflow_db_user), sql.Literal(s.mlflow_db_password)
                    )
                )
            for dbname, owner in ((s.db_name, s.db_user), (s.mlflow_db_name, s.mlflow_db_user)):
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)
                ).fetchone()
                if not exists:
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(dbname), sql.Identifier(owner)
                        )
                    )
