"""`carrara datasets ...` against the live API process (uvicorn) on the test database and Kafka.

The commands run in-process through typer's CliRunner (fast), talking HTTP to the live API like a
CI pipeline. The live API's data is committed, so the dataset name is unique to this run.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import orjson
import yaml
from confluent_kafka import Producer
from typer.testing import CliRunner

from carrara.cli import app
from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import LiveApi

runner = CliRunner()


def carrara(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    # Wide columns, so rich neither wraps messages nor squeezes table cells.
    result = runner.invoke(app, list(args), env={**env, "COLUMNS": "250"})
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def test_datasets_commands_against_a_running_api(
    live_api: LiveApi, stack_settings: Settings, topic_name: str, tmp_path: Path
) -> None:
    cli_env = live_api.env
    name = f"cli-clicks-{uuid.uuid4().hex[:8]}"
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    base_ms = (int(time.time()) - 600) * 1000
    for i in range(6):
        event = {"user": f"u{i}", "amount": i * 1.5, "country": "FR", "clicked": i % 2 == 0}
        producer.produce(
            topic_name, value=orjson.dumps(event), partition=i % 2, timestamp=base_ms + i * 1000
        )
    assert producer.flush(30) == 0
    spec = {
        "name": name,
        "topic": topic_name,
        "key_field": "user",
        "features": [{"name": "amount", "type": "float"}, {"name": "country", "type": "category"}],
        "label_field": "clicked",
        "task": "binary",
        "description": "clicks from the CLI test",
    }
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump(spec))

    code, out, err = carrara(cli_env, "datasets", "create", "-f", str(path))
    assert code == 0, err
    assert f"dataset {name} created" in out
    assert "schema matches the 6 most recent events" in out

    code, _, err = carrara(cli_env, "datasets", "create", "-f", str(path))
    assert code == 2
    assert f"409 dataset '{name}' already exists" in err

    bad = {**spec, "name": f"{name}-bad", "features": [{"name": "country", "type": "float"}]}
    (tmp_path / "bad.json").write_bytes(orjson.dumps(bad))
    code, _, err = carrara(cli_env, "datasets", "create", "-f", str(tmp_path / "bad.json"))
    assert code == 2
    assert "422 the schema does not match 6 recent events" in err
    assert "'country'" in err

    code, out, _ = carrara(cli_env, "datasets", "list", "--json")
    assert code == 0
    names = [d["name"] for d in orjson.loads(out)]
    assert name in names
    assert f"{name}-bad" not in names
    code, out, _ = carrara(cli_env, "datasets", "list", "--name-prefix", "nothing-")
    assert code == 0
    assert name not in out

    code, out, _ = carrara(cli_env, "datasets", "show", name)
    assert code == 0
    assert "amount" in out
    assert "category" in out
    code, out, _ = carrara(cli_env, "datasets", "show", name, "--json")
    assert orjson.loads(out)["label_field"] == "clicked"

    code, out, err = carrara(cli_env, "datasets", "snapshot", name)
    assert code == 0, err
    assert f"{name} v1: 6 events (0:[0,3) 1:[0,3))" in out

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base_ms / 1000 + 2))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base_ms / 1000 + 5))
    code, out, err = carrara(
        cli_env,
        "datasets",
        "snapshot",
        name,
        "--from",
        since,
        "--to",
        until,
        "--description",
        "three seconds",
        "--json",
    )
    assert code == 0, err
    v2 = orjson.loads(out)
    assert v2["number"] == 2
    assert v2["mode"] == "time_range"
    assert v2["event_count"] == 3  # events 2, 3 and 4
    assert v2["description"] == "three seconds"

    code, out, _ = carrara(cli_env, "datasets", "versions", name, "--json")
    assert code == 0
    assert [(v["number"], v["event_count"]) for v in orjson.loads(out)] == [(2, 3), (1, 6)]
    code, out, _ = carrara(cli_env, "datasets", "versions", name)
    assert "v2" in out
    assert "time_range" in out

    code, _, err = carrara(cli_env, "datasets", "show", "missing")
    assert code == 2
    assert "404 dataset 'missing' does not exist" in err
    code, _, err = carrara(cli_env, "datasets", "snapshot", name, "--to", "yesterday")
    assert code == 2
    assert "422" in err

    deleted = httpx.delete(
        f"{live_api.url}/api/v1/datasets/{name}",
        headers={"Authorization": f"Bearer {live_api.admin_token}"},
        timeout=10,
    )
    assert deleted.status_code == 204
