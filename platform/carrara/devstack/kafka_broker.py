"""Apache Kafka, single node in KRaft combined mode, from the broker's jars on Maven Central.

Maven resolves `org.apache.kafka:kafka_2.13` and its runtime dependencies from the pom shipped in
`resources/kafka-pom.xml` (cached in ~/.m2); the broker then runs on the machine's Java 17 with the
same main classes that Kafka's own bin/ scripts call.

Secured (`carrara stack up --secure`, see `devstack/secure.py`): one SASL_SSL listener
(SCRAM-SHA-512 over TLS) for clients and inter-broker traffic, the controller on
SASL_PLAINTEXT/PLAIN bound to the stack's host, the StandardAuthorizer with `broker` and `admin`
as super users, SCRAM users added at `kafka-storage format --add-scram`, and the identities' ACLs
created once the broker answers.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from importlib import resources
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from carrara.devstack.processes import LaunchSpec
from carrara.devstack.secure import (
    ADMIN,
    BROKER,
    KAFKA_USERS,
    SCRAM,
    SecureMaterial,
    apply_acls,
    stack_acls,
    write_private,
)
from carrara.devstack.service import Service, StackError
from carrara.settings import Settings
from carrara.streams.client_config import admin_config


def _resource(name: str) -> Path:
    return Path(str(resources.files("carrara.devstack") / "resources" / name))


class KafkaService(Service):
    name = "kafka"
    label = "Apache Kafka"

    def __init__(
        self,
        settings: Settings,
        secure: SecureMaterial | None = None,
        data_prefixes: tuple[str, ...] = (),
    ) -> None:
        """`secure`: run the secured broker with that material; `data_prefixes`: the topic
        prefixes its ACLs give scorers and the monitor (none: any topic)."""
        super().__init__(settings)
        self.secure = secure
        self.data_prefixes = data_prefixes
        if secure is not None:
            self.label = "Apache Kafka (SASL_SSL, ACLs)"

    @property
    def port(self) -> int:
        return self.settings.kafka_port

    @property
    def endpoint(self) -> str:
        return self.settings.kafka_bootstrap

    @property
    def libs_dir(self) -> Path:
        return self.home / "libs"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_file(self) -> Path:
        return self.home / "server.properties"

    def server_properties(self) -> str:
        s = self.settings
        controller = f"{s.host}:{s.kafka_controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{s.host}:{s.kafka_port},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{s.host}:{s.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "3",
            # Topics are created explicitly by the platform (with the partitions asked for).
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "-1",
        }
        if self.secure is not None:
            props |= self._secure_properties()
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _secure_properties(self) -> dict[str, str]:
        assert self.secure is not None
        s, m = self.settings, self.secure
        controller = f"{s.host}:{s.kafka_controller_port}"
        broker_password = m.password(f"kafka:{BROKER}")
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        return {
            "listeners": f"SASL_SSL://{s.host}:{s.kafka_port},CONTROLLER://{controller}",
            "advertised.listeners": f"SASL_SSL://{s.host}:{s.kafka_port}",
            "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,SASL_SSL:SASL_SSL",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": SCRAM,
            "sasl.mechanism.inter.broker.protocol": SCRAM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                f'{scram} required username="{BROKER}" password="{broker_password}";'
            ),
            # SCRAM credentials live in the metadata log, which the controller serves: the
            # controller listener authenticates with PLAIN (its one user is the broker itself).
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": (
                f'{plain} required username="{BROKER}" password="{broker_password}" '
                f'user_{BROKER}="{broker_password}";'
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(m.keystore),
            "ssl.keystore.password": m.password("keystore"),
            "ssl.key.password": m.password("keystore"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(m.ca_file),
            "ssl.client.auth": "none",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{BROKER};User:{ADMIN}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def admin_settings(self) -> Settings:
        """Settings whose Kafka clients reach this broker as the stack's admin (when secured)."""
        if self.secure is None:
            return self.settings
        return self.secure.client_settings(self.settings, ADMIN)

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError("java is not installed: Kafka needs Java 17 or newer")
        return java

    def prepare(self) -> None:
        self._java()
        self.home.mkdir(parents=True, exist_ok=True)
        self._fetch_jars()
        if self.secure is not None:
            self.secure.ensure_tls()
        # 0600: a secured broker's file holds its passwords.
        write_private(self.config_file, self.server_properties())
        if not (self.data_dir / "meta.properties").exists():
            self._format_storage()

    def _fetch_jars(self) -> None:
        version = self.settings.kafka_version
        stamp = self.libs_dir / ".version"
        if stamp.exists() and stamp.read_text().strip() == version:
            return
        if shutil.which("mvn") is None:
            raise StackError("mvn is not installed: Maven fetches the Kafka broker's jars")
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        result = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(_resource("kafka-pom.xml")),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={self.libs_dir}",
                "-DincludeScope=runtime",
                f"-Dkafka.version={version}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"Maven could not resolve Kafka {version}:\n{result.stdout[-3000:]}")
        stamp.write_text(version + "\n")

    def _format_storage(self) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        result = subprocess.run(
            [
                self._java(),
                "-cp",
                f"{self.libs_dir}/*",
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                cluster_id,
                "-c",
                str(self.config_file),
                *self._scram_users(),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"kafka-storage format failed:\n{result.stdout}\n{result.stderr}")

    def _scram_users(self) -> list[str]:
        """`--add-scram` arguments: the broker, the admin and every identity's user."""
        if self.secure is None:
            return []
        args = []
        for user in (BROKER, ADMIN, *KAFKA_USERS.values()):
            password = self.secure.password(f"kafka:{user}")
            args += ["--add-scram", f"{SCRAM}=[name={user},password={password}]"]
        return args

    def launch_spec(self) -> LaunchSpec:
        heap = self.settings.kafka_heap
        return LaunchSpec(
            argv=[
                self._java(),
                f"-Xms{heap}",
                f"-Xmx{heap}",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={_resource('kafka-log4j2.properties')}",
                f"-Dkafka.logs.dir={self.home / 'logs'}",
                "-cp",
                f"{self.libs_dir}/*",
                "kafka.Kafka",
                str(self.config_file),
            ],
            cwd=self.home,
            stop_timeout=60.0,
        )

    def healthy(self) -> bool:
        if not self.port_in_use():  # cheap check first: librdkafka logs every refused connect
            return False
        config = admin_config(self.endpoint, self.admin_settings())
        admin = AdminClient({**config, "socket.timeout.ms": 2000, "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=2)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    def after_healthy(self) -> None:
        """Secured: create the identities' ACLs (idempotent)."""
        if self.secure is not None:
            acls = stack_acls(self.settings, self.data_prefixes)
            apply_acls(self.endpoint, self.admin_settings(), acls)
