"""Apicurio Registry (Apache-2.0): the stack's Schema Registry, from Maven Central.

Maven unpacks `io.apicurio:apicurio-registry-app` (classifier `all`, type `tar.gz`, a Quarkus
application) with the pom in `resources/apicurio-pom.xml`; it runs as `java -jar quarkus-run.jar`.
Version 3.3.x needs Java 21 or newer: the Java is found in CARRARA_SCHEMA_REGISTRY_JAVA_HOME,
JAVA_HOME, `/usr/lib/jvm/*` or `/opt/*` (Debian 12 ships Java 17 only; the machines this project
runs on have a Temurin 25 JDK beside it). CARRARA_SCHEMA_REGISTRY_VERSION=3.0.9 runs on Java 17.

Clients use its Confluent-compatible API (`/apis/ccompat/v7`, what `confluent_kafka.
schema_registry` speaks). HTTP and the management interface (health) are bound to the stack's
host; schemas are kept in an H2 database file under the service's home, so the ids that framed
records carry survive a restart like the records themselves; the global compatibility rule is
BACKWARD (Confluent's default: a new version must read what the previous one wrote).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import httpx

from carrara.devstack.processes import LaunchSpec
from carrara.devstack.service import Service, StackError

# Apicurio 3.1 and later are built for Java 21.
MIN_JAVA = 21
_JAVA_VERSION = re.compile(r'^JAVA_VERSION="(\d+)', re.MULTILINE)


def _resource(name: str) -> Path:
    return Path(str(resources.files("carrara.devstack") / "resources" / name))


def java_major(java_home: Path) -> int | None:
    """The major version of the JDK/JRE at `java_home` (its `release` file), None if not one."""
    if not (java_home / "bin" / "java").is_file():
        return None
    try:
        found = _JAVA_VERSION.search((java_home / "release").read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def find_java(minimum: int, preferred: list[Path | None]) -> Path | None:
    """The `java` of the first home in `preferred`, then under /usr/lib/jvm and /opt, that is at
    least version `minimum` (the newest of those found in the directories)."""
    for home in preferred:
        if home is not None and (java_major(home) or 0) >= minimum:
            return home / "bin" / "java"
    candidates = []
    for root in (Path("/usr/lib/jvm"), Path("/opt")):
        if root.is_dir():
            for home in root.iterdir():
                major = java_major(home)
                if major is not None and major >= minimum:
                    candidates.append((major, str(home)))
    if not candidates:
        return None
    return Path(max(candidates)[1]) / "bin" / "java"


def required_java(version: str) -> int:
    """The Java an Apicurio Registry version needs: 3.0.x runs on 17, later ones on 21."""
    parts = version.split(".")
    if parts[0] == "3" and len(parts) > 1 and parts[1] == "0":
        return 17
    return MIN_JAVA


class SchemaRegistryService(Service):
    name = "schema-registry"
    label = "Schema Registry (Apicurio)"

    @property
    def port(self) -> int:
        return self.settings.schema_registry_port

    @property
    def endpoint(self) -> str:
        return self.settings.schema_registry_url

    @property
    def app_dir(self) -> Path:
        return self.home / "app"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def _java(self) -> str:
        version = self.settings.schema_registry_version
        minimum = required_java(version)
        env_home = os.environ.get("JAVA_HOME")
        preferred = [self.settings.schema_registry_java_home, Path(env_home) if env_home else None]
        system = shutil.which("java")
        if system is not None:
            preferred.append(Path(system).resolve().parent.parent)
        java = find_java(minimum, preferred)
        if java is None:
            raise StackError(
                f"Apicurio Registry {version} needs Java {minimum} or newer, and none was found "
                "(CARRARA_SCHEMA_REGISTRY_JAVA_HOME, JAVA_HOME, /usr/lib/jvm, /opt): install one, "
                "or set CARRARA_SCHEMA_REGISTRY_VERSION=3.0.9 (runs on Java 17)"
            )
        return str(java)

    def _launcher(self) -> Path:
        """`quarkus-run.jar` (3.x fast-jar layout), or an older build's `*-runner.jar`."""
        fast = self.app_dir / "quarkus-run.jar"
        if fast.is_file():
            return fast
        runners = sorted(self.app_dir.glob("*-runner.jar"))
        if runners:
            return runners[0]
        raise StackError(f"no quarkus-run.jar or *-runner.jar in {self.app_dir}")

    def prepare(self) -> None:
        self._java()
        self.home.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._fetch_app()

    def _fetch_app(self) -> None:
        version = self.settings.schema_registry_version
        stamp = self.app_dir / ".version"
        if stamp.exists() and stamp.read_text().strip() == version:
            return
        if shutil.which("mvn") is None:
            raise StackError("mvn is not installed: Maven fetches Apicurio Registry")
        shutil.rmtree(self.app_dir, ignore_errors=True)
        result = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(_resource("apicurio-pom.xml")),
                "dependency:unpack",
                f"-Dapicurio.version={version}",
                f"-Dapicurio.output={self.app_dir}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(
                f"Maven could not fetch Apicurio Registry {version}:\n{result.stdout[-3000:]}"
            )
        self._launcher()
        stamp.write_text(version + "\n")

    def launch_spec(self) -> LaunchSpec:
        s = self.settings
        properties = {
            "quarkus.http.host": s.host,
            "quarkus.http.port": s.schema_registry_port,
            "quarkus.management.host": s.host,
            "quarkus.management.port": s.schema_registry_management_port,
            "apicurio.rules.global.compatibility": "BACKWARD",
            "apicurio.storage.kind": "sql",
            "apicurio.storage.sql.kind": "h2",
            "apicurio.datasource.url": f"jdbc:h2:file:{self.data_dir / 'registry'}",
        }
        return LaunchSpec(
            argv=[
                self._java(),
                f"-Xmx{s.schema_registry_heap}",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
                *(f"-D{k}={v}" for k, v in properties.items()),
                "-jar",
                str(self._launcher()),
            ],
            cwd=self.home,
            stop_timeout=30.0,
        )

    def healthy(self) -> bool:
        s = self.settings
        try:
            ready = httpx.get(
                f"http://{s.host}:{s.schema_registry_management_port}/health/ready", timeout=2
            )
            if ready.status_code != 200:
                return False
            return httpx.get(f"{self.endpoint}/config", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
