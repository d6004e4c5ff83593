"""Which Kafka topics users may point deployments and datasets at, and how many they may create.

Carrara's own topics (`carrara.*`, and whatever the deployments, status and alerts topics are
configured to) and Kafka's internal ones (`__consumer_offsets`, `__transaction_state`: `__*`) are
never allowed: a deployment writing predictions into the compacted deployments topic would corrupt
every scorer's desired state. Beyond that, an operator can restrict topics to prefixes, globally
(`CARRARA_ALLOWED_TOPIC_PREFIXES`) or per scorer pool (`CARRARA_POOL_TOPIC_PREFIXES`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from carrara.errors import Invalid
from carrara.settings import Settings

RESERVED_PREFIXES = ("carrara.", "__")


def _prefixes(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


@dataclass(frozen=True)
class TopicPolicy:
    prefixes: tuple[str, ...] = ()  # empty: any topic that is not reserved
    pool_prefixes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    internal: frozenset[str] = frozenset()
    max_partitions: int = 100
    max_topics_per_request: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> TopicPolicy:
        return cls(
            prefixes=_prefixes(settings.allowed_topic_prefixes),
            pool_prefixes={k: _prefixes(v) for k, v in settings.pool_topic_prefixes.items()},
            internal=frozenset(
                {settings.deployments_topic, settings.scorer_status_topic, settings.alerts_topic}
            ),
            max_partitions=settings.max_topic_partitions,
            max_topics_per_request=settings.max_topics_per_request,
        )

    def problem(self, topic: str, pool: str | None = None) -> str | None:
        """Why `topic` may not be used (by a deployment of `pool`), or None."""
        if topic in self.internal or topic.startswith(RESERVED_PREFIXES):
            return (
                f"'{topic}' is reserved: topics starting with 'carrara.' (Carrara's control "
                "topics) or '__' (Kafka's internal topics) cannot be used"
            )
        allowed = self.pool_prefixes.get(pool, self.prefixes) if pool else self.prefixes
        if allowed and not topic.startswith(allowed):
            where = f"pool '{pool}'" if pool in self.pool_prefixes else "this platform"
            listed = " or ".join(f"'{p}'" for p in allowed)
            return f"'{topic}' is not allowed for {where}: topics must start with {listed}"
        return None

    def check(self, topics: Mapping[str, str | None], pool: str | None = None) -> None:
        """Invalid (422) naming every field whose topic may not be used."""
        errors = [
            {"field": name, "message": message}
            for name, topic in topics.items()
            if topic and (message := self.problem(topic, pool)) is not None
        ]
        if errors:
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise Invalid(detail, errors=errors)

    def check_creation(self, topics: Sequence[tuple[str, int]]) -> None:
        """Invalid unless creating these (topic, partitions) stays within the bounds."""
        if len(topics) > self.max_topics_per_request:
            raise Invalid(
                f"a request may create at most {self.max_topics_per_request} topics "
                f"(CARRARA_MAX_TOPICS_PER_REQUEST), not {len(topics)}"
            )
        for topic, partitions in topics:
            if partitions > self.max_partitions:
                raise Invalid(
                    f"topic '{topic}': at most {self.max_partitions} partitions "
                    f"(CARRARA_MAX_TOPIC_PARTITIONS), not {partitions}",
                    errors=[
                        {
                            "field": "create_topic.partitions",
                            "message": f"at most {self.max_partitions}",
                        }
                    ],
                )
