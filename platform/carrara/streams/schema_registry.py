"""The Schema Registry client every process shares: writer schemas by id, subjects, registering.

A thin layer over `confluent_kafka.schema_registry.SchemaRegistryClient` (the Confluent API, which
Apicurio serves at `/apis/ccompat/v7`), configured from `CARRARA_SCHEMA_REGISTRY_*` (URL, basic
auth, TLS). Writer schemas are immutable per id, so each is fetched once per process and kept; an
id the registry does not know is remembered as unknown for `UNKNOWN_TTL_S` (a burst of records
framed with a foreign id asks once, a schema registered later is still found). A registry that does
not answer raises `RegistryUnavailable`: callers retry the batch rather than dead-letter events that
are fine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError

from carrara.settings import Settings, get_settings

# The Confluent wire format: magic byte 0, then the schema id (4 bytes, big-endian).
MAGIC = 0
HEADER_BYTES = 5
UNKNOWN_TTL_S = 10.0
# Confluent's error codes for an unknown schema id / subject / version.
_NOT_FOUND = (40401, 40402, 40403)


class RegistryUnavailable(RuntimeError):
    """The registry did not answer (or refused us): nothing can be said about the schema."""


class SchemaNotFound(LookupError):
    """The registry answered that it does not know this id, subject or version."""


@dataclass(frozen=True)
class SubjectVersion:
    subject: str
    version: int
    schema_id: int
    schema: Schema


def client_config(settings: Settings) -> dict[str, Any]:
    """`SchemaRegistryClient` settings from CARRARA_SCHEMA_REGISTRY_* (URL, basic auth, TLS)."""
    config: dict[str, Any] = {"url": settings.schema_registry_url}
    password = ""
    if settings.schema_registry_password is not None:
        password = settings.schema_registry_password.get_secret_value()
    elif settings.schema_registry_password_file is not None:
        password = settings.schema_registry_password_file.read_text().strip()
    if settings.schema_registry_username:
        config["basic.auth.user.info"] = f"{settings.schema_registry_username}:{password}"
    if settings.schema_registry_ca_location is not None:
        config["ssl.ca.location"] = str(settings.schema_registry_ca_location)
    if settings.schema_registry_certificate_location is not None:
        config["ssl.certificate.location"] = str(settings.schema_registry_certificate_location)
    if settings.schema_registry_key_location is not None:
        config["ssl.key.location"] = str(settings.schema_registry_key_location)
    return config


def _not_found(exc: Exception) -> bool:
    return isinstance(exc, SchemaRegistryError) and (
        exc.http_status_code == 404 or exc.error_code in _NOT_FOUND
    )


def _describe(exc: Exception) -> str:
    if isinstance(exc, SchemaRegistryError):
        return f"HTTP {exc.http_status_code} ({exc.error_code}): {exc.error_message}"
    return f"{type(exc).__name__}: {exc}"


class Registry:
    """Writer schemas by id (cached), subjects' versions, and registration."""

    def __init__(self, client: SchemaRegistryClient, url: str = "") -> None:
        self.client = client
        self.url = url
        self._schemas: dict[int, Schema] = {}
        self._unknown: dict[int, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        config = client_config(settings)
        # Bounded retries: a scorer rather retries its batch than blocks on a dead registry.
        config |= {"max.retries": 2, "timeout": 10}
        return cls(SchemaRegistryClient(config), settings.schema_registry_url)

    def writer_schema(self, schema_id: int) -> Schema:
        """The schema registered under `schema_id`; SchemaNotFound / RegistryUnavailable."""
        found = self._schemas.get(schema_id)
        if found is not None:
            return found
        with self._lock:
            seen = self._unknown.get(schema_id)
            if seen is not None and time.monotonic() - seen < UNKNOWN_TTL_S:
                raise SchemaNotFound(f"schema id {schema_id} is not in the registry")
        try:
            schema = self.client.get_schema(schema_id)
        except Exception as exc:
            if _not_found(exc):
                with self._lock:
                    self._unknown[schema_id] = time.monotonic()
                raise SchemaNotFound(f"schema id {schema_id} is not in the registry") from exc
            raise RegistryUnavailable(
                f"the Schema Registry at {self.url} did not answer: {_describe(exc)}"
            ) from exc
        with self._lock:
            self._schemas[schema_id] = schema
            self._unknown.pop(schema_id, None)
        return schema

    def _call(self, what: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as exc:
            if _not_found(exc):
                raise SchemaNotFound(f"{what} is not in the registry") from exc
            raise RegistryUnavailable(
                f"the Schema Registry at {self.url} did not answer: {_describe(exc)}"
            ) from exc

    def latest(self, subject: str) -> SubjectVersion:
        """The latest version of `subject`; SchemaNotFound when the subject has none."""
        # Not the client's get_latest_version: it caches the answer for the client's lifetime.
        versions = self.versions(subject)
        if not versions:
            raise SchemaNotFound(f"subject '{subject}' has no version")
        return self.version(subject, versions[-1])

    def versions(self, subject: str) -> list[int]:
        """The version numbers of `subject`, oldest first."""
        return sorted(self._call(f"subject '{subject}'", self.client.get_versions, subject))

    def version(self, subject: str, version: int) -> SubjectVersion:
        found = self._call(
            f"version {version} of subject '{subject}'", self.client.get_version, subject, version
        )
        return SubjectVersion(subject, int(found.version), int(found.schema_id), found.schema)

    def register(self, subject: str, schema: Schema) -> int:
        """Register `schema` under `subject` (idempotent: an existing version's id is returned)."""
        return int(self._call(f"subject '{subject}'", self.client.register_schema, subject, schema))


_default: dict[str, Registry] = {}
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process's registry client, from its settings (one per URL, its cache shared)."""
    settings = get_settings()
    with _default_lock:
        registry = _default.get(settings.schema_registry_url)
        if registry is None:
            registry = _default[settings.schema_registry_url] = Registry.from_settings(settings)
        return registry


def frame(schema_id: int, payload: bytes) -> bytes:
    """A payload in the Confluent wire format of `schema_id`."""
    return bytes((MAGIC,)) + schema_id.to_bytes(4, "big") + payload
