"""The broker's server.properties follows the configured ports and keeps data under the home."""

from __future__ import annotations

from pathlib import Path

from carrara.devstack.kafka_broker import KafkaService
from carrara.settings import Settings


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_server_properties_use_configured_ports_and_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, kafka_port=19092, kafka_controller_port=19093)
    props = _props(KafkaService(settings).server_properties())
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")
    assert props["auto.create.topics.enable"] == "false"
