"""Apache Kafka, single node in KRaft combined mode, from the broker's jars on Maven Central.

Maven resolves `org.apache.kafka:kafka_2.13` and its runtime dependencies from the pom shipped in
`resources/kafka-pom.xml` (cached in ~/.m2); the broker then runs on the machine's Java 17 with the
same main classes that Kafka's own bin/ scripts call.
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
from carrara.devstack.service import Service, StackError


def _resource(name: str) -> Path:
    return Path(str(resources.files("carrara.devstack") / "resources" / name))


class KafkaService(Service):
    name = "kafka"
    label = "Apache Kafka"

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
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError("java is not installed: Kafka needs Java 17 or newer")
        return java

    def prepare(self) -> None:
        self._java()
        self.home.mkdir(parents=True, exist_ok=True)
        self._fetch_jars()
        self.config_file.write_text(self.server_properties())
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
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"kafka-storage format failed:\n{result.stdout}\n{result.stderr}")

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
        admin = AdminClient(
            {"bootstrap.servers": self.endpoint, "socket.timeout.ms": 2000, "log_level": 0}
        )
        try:
            metadata = admin.list_topics(timeout=2)
        except KafkaException:
            return False
        return bool(metadata.brokers)
