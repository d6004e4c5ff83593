"""Topic administration: create and describe topics, waiting for the broker to confirm."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

# confluent_kafka.admin re-exports these on purpose ("accessible using this public module") but
# without `__all__`, which a type checker reads as private.
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,  # pyright: ignore[reportPrivateImportUsage]
    ConfigEntry,  # pyright: ignore[reportPrivateImportUsage]
    ConfigResource,  # pyright: ignore[reportPrivateImportUsage]
    NewTopic,  # pyright: ignore[reportPrivateImportUsage]
)

from carrara.settings import Settings
from carrara.streams.client_config import admin_config


class TopicAdmin:
    def __init__(self, bootstrap: str, settings: Settings | None = None) -> None:
        """An admin client of `bootstrap` with the security settings of `settings` (by default
        the process's own, see `client_config.connection_config`)."""
        self._admin = AdminClient(admin_config(bootstrap, settings))

    def create_topic(
        self,
        name: str,
        partitions: int,
        *,
        config: dict[str, str] | None = None,
        exist_ok: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Create `name` and wait until the broker has it; idempotent with `exist_ok`."""
        futures = self._admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=timeout,
        )
        try:
            futures[name].result(timeout=timeout)
        except KafkaException as exc:
            error = exc.args[0]
            if not (exist_ok and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise

    def ensure_compacted_topic(
        self, name: str, partitions: int = 1, *, timeout: float = 30.0
    ) -> bool:
        """Make `name` exist with `cleanup.policy=compact`; True if it was created or altered."""
        if not self.partitions(name, timeout=timeout):
            try:
                self.create_topic(
                    name, partitions, config={"cleanup.policy": "compact"}, timeout=timeout
                )
                return True
            except KafkaException as exc:
                # Another process created it meanwhile: fall through and check its policy.
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        configs = self._admin.describe_configs([resource], request_timeout=timeout)[resource]
        policy = configs.result(timeout=timeout)["cleanup.policy"].value or ""
        if "compact" in policy.split(","):
            return False
        # A topic auto-created (or made by hand) with `delete` would lose the latest revision of
        # an idle deployment after retention: switch it to compaction rather than refuse to start.
        entry = ConfigEntry(
            "cleanup.policy", "compact", incremental_operation=AlterConfigOpType.SET
        )
        alter = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[entry])
        self._admin.incremental_alter_configs([alter], request_timeout=timeout)[alter].result(
            timeout=timeout
        )
        return True

    def partitions(self, name: str, timeout: float = 10.0) -> list[int]:
        """Partition ids of `name`; empty when the topic does not exist."""
        metadata = self._admin.list_topics(topic=name, timeout=timeout)
        topic = metadata.topics.get(name)
        if topic is None or topic.error is not None:
            return []
        return sorted(topic.partitions)

    def delete_topics(self, names: list[str], timeout: float = 30.0) -> None:
        if not names:
            return
        for future in self._admin.delete_topics(names, operation_timeout=timeout).values():
            future.result(timeout=timeout)

    def ping(self, timeout: float = 2.0) -> int:
        """Number of brokers that answered a metadata request; raises KafkaException if none."""
        return len(self._admin.list_topics(timeout=timeout).brokers)
