"""Schemathesis drives every operation of the OpenAPI description against a live API process.

No generated request may produce a 5xx, and every response must match the documented status codes,
content types and schemas, and schema-invalid requests must be refused with a 4xx. (Schemathesis's
"positive data acceptance" check is left out on purpose: a schema-valid request may still name a
topic or a model version that does not exist, and a precise 4xx is the right answer for those;
test_api_conventions.py runs every check on the paginated and dated operations.) The API runs on
a database of its own, so the fuzzer's writes (and any token it revokes) cannot disturb other
tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import RUN_ID, LiveApi, migrated_database, running_api


@pytest.fixture(scope="module")
def fuzz_api(stack_settings: Settings) -> Iterator[LiveApi]:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    topics_before = set(admin._admin.list_topics(timeout=10).topics)
    # The fuzzed API may only name (and create) topics under a prefix of its own, so what it
    # created can be removed without touching anything else on the shared broker (other tests'
    # topics, a benchmark running beside the suite).
    prefix = f"fuzz{RUN_ID}"
    with (
        migrated_database(stack_settings, f"carrara_fuzz_{RUN_ID}") as url,
        running_api(
            url,
            "fuzz",
            CARRARA_DEPLOYMENTS_TOPIC=f"test-{RUN_ID}-fuzz-deployments",
            CARRARA_ALLOWED_TOPIC_PREFIXES=prefix,
        ) as api,
    ):
        yield api
    created = set(admin._admin.list_topics(timeout=10).topics) - topics_before
    ours = {t for t in created if t.startswith(prefix)}
    ours |= created & {f"test-{RUN_ID}-fuzz-deployments"}
    admin.delete_topics(sorted(ours))


def test_every_operation_conforms_and_never_errors(fuzz_api: LiveApi) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzz_api.admin_token}"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
