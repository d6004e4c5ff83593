"""The secured stack's profile, broker properties and ACLs (no broker needed)."""

from __future__ import annotations

import stat
from pathlib import Path

from confluent_kafka.admin import AclOperation, AclPermissionType, ResourceType

from carrara.devstack.kafka_broker import KafkaService
from carrara.devstack.secure import (
    KAFKA_USERS,
    PORT_OFFSET,
    SecureMaterial,
    secure_profile,
    stack_acls,
    write_private,
)
from carrara.settings import Settings


def test_the_secured_profile_has_its_own_home_and_ports(tmp_path: Path) -> None:
    plain = Settings(home=tmp_path)
    secure = secure_profile(plain)
    assert secure.home == tmp_path / "secure"
    assert secure.kafka_port == plain.kafka_port + PORT_OFFSET
    assert secure.kafka_bootstrap.endswith(f":{plain.kafka_port + PORT_OFFSET}")
    assert secure.mlflow_url.endswith(f":{plain.mlflow_port + PORT_OFFSET}")
    assert f":{plain.pg_port + PORT_OFFSET}/" in secure.database_url


def test_the_plain_broker_is_unchanged_and_the_secured_one_authenticates(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    plain = KafkaService(settings).server_properties()
    assert "PLAINTEXT://" in plain
    assert "sasl" not in plain
    assert "authorizer" not in plain

    secured = KafkaService(settings, SecureMaterial(tmp_path)).server_properties()
    props = dict(line.split("=", 1) for line in secured.splitlines())
    assert props["listeners"].startswith("SASL_SSL://")
    assert "PLAINTEXT://" not in props["listeners"]
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:broker;User:admin"


def test_secrets_files_are_private_from_the_first_byte(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "x.password"
    write_private(path, "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    material = SecureMaterial(tmp_path)
    assert material.password("kafka:admin") == material.password("kafka:admin")  # made once
    assert stat.S_IMODE((tmp_path / "secrets" / "passwords.json").stat().st_mode) == 0o600


def test_only_the_control_plane_may_write_the_deployments_topic() -> None:
    settings = Settings()
    acls = stack_acls(settings, ("fraud.",))
    deployments = settings.deployments_topic

    def grants(user: str, permission: AclPermissionType) -> set[tuple[str, str, str]]:
        return {
            (str(a.restype), a.name, str(a.operation))
            for a in acls
            if a.principal == f"User:{user}" and a.permission_type == permission
        }

    topic, write = str(ResourceType.TOPIC), str(AclOperation.WRITE)
    control_allowed = grants(KAFKA_USERS["control"], AclPermissionType.ALLOW)
    assert (topic, "*", str(AclOperation.ALL)) in control_allowed
    for identity in ("scorer", "monitor"):
        allowed = grants(KAFKA_USERS[identity], AclPermissionType.ALLOW)
        denied = grants(KAFKA_USERS[identity], AclPermissionType.DENY)
        assert (topic, deployments, write) not in allowed
        assert (topic, deployments, write) in denied
    scorer = grants(KAFKA_USERS["scorer"], AclPermissionType.ALLOW)
    assert (topic, deployments, str(AclOperation.READ)) in scorer
    assert (topic, "fraud.", write) in scorer  # its data topics, by prefix
    assert (topic, settings.scorer_status_topic, write) in scorer
