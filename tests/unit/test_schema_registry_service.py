"""The local stack's Schema Registry: which Java runs it, and how it is started."""

from __future__ import annotations

from pathlib import Path

from carrara.devstack.manager import Stack
from carrara.devstack.schema_registry import (
    SchemaRegistryService,
    find_java,
    java_major,
    required_java,
)
from carrara.settings import Settings


def _jdk(root: Path, name: str, version: str) -> Path:
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "java").write_text("#!/bin/sh\n")
    (home / "release").write_text(f'IMPLEMENTOR="x"\nJAVA_VERSION="{version}"\n')
    return home


def test_java_versions_come_from_the_release_file(tmp_path: Path) -> None:
    assert java_major(_jdk(tmp_path, "jdk17", "17.0.15")) == 17
    assert java_major(_jdk(tmp_path, "jdk25", "25.0.3")) == 25
    assert java_major(tmp_path / "nothing") is None


def test_a_preferred_java_home_wins_when_it_is_new_enough(tmp_path: Path) -> None:
    old = _jdk(tmp_path, "old", "17.0.1")
    new = _jdk(tmp_path, "new", "21.0.2")
    assert find_java(21, [old, new]) == new / "bin" / "java"
    assert find_java(17, [old, new]) == old / "bin" / "java"


def test_apicurio_3_0_runs_on_java_17_and_later_versions_need_21() -> None:
    assert required_java("3.0.9") == 17
    assert required_java("3.3.3") == 21


def test_the_registry_binds_to_the_stack_host_with_backward_compatibility(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, schema_registry_port=18181)
    service = SchemaRegistryService(settings)
    java = find_java(21, [])
    if java is None:  # no Java 21+ on this machine: the launch spec cannot be built
        return
    (service.app_dir).mkdir(parents=True)
    (service.app_dir / "quarkus-run.jar").write_text("")
    argv = service.launch_spec().argv
    assert "-Dquarkus.http.host=127.0.0.1" in argv
    assert "-Dquarkus.http.port=18181" in argv
    assert "-Dquarkus.management.host=127.0.0.1" in argv
    assert "-Dapicurio.rules.global.compatibility=BACKWARD" in argv
    assert argv[-2:] == ["-jar", str(service.app_dir / "quarkus-run.jar")]
    assert settings.schema_registry_url == "http://127.0.0.1:18181/apis/ccompat/v7"


def test_the_stack_starts_the_registry_before_the_applications(tmp_path: Path) -> None:
    stack = Stack(Settings(home=tmp_path))
    order = list(stack.services)
    assert order.index("kafka") < order.index("schema-registry") < order.index("api")
    assert "schema-registry" in stack.services["scorer-1"].requires
