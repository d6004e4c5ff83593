"""Carrara: a self-hosted, Kafka-native ML platform."""

__version__ = "0.1.0"
