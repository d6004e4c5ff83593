"""Secrets: generated when missing (0600, never a constant), refused when weak; deployment
records signed over their key and exact bytes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import typer

from carrara.commands.tokens import parse_duration
from carrara.secret_keys import (
    WeakSecret,
    deployment_signing_keys,
    replace_private_file,
    session_secret,
    write_private_file,
)
from carrara.settings import DEV_SECRET_KEY, Settings
from carrara.streams.record_signing import SIGNATURE_HEADER, header_value, record_problem, sign

RANDOM = "3f9c1e7a5b2d8c4e6a0f1b3d5e7c9a2b4d6f8e0a"


def test_without_a_key_the_first_start_generates_one_kept_private(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    key = session_secret(settings)
    path = tmp_path / "home" / "secret-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32
    assert key != DEV_SECRET_KEY
    assert session_secret(settings) == key  # the next start reads it back
    other = session_secret(Settings(home=tmp_path / "elsewhere"))
    assert other != key  # random, never a constant


def test_a_readable_generated_key_is_refused(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    session_secret(settings)
    (tmp_path / "secret-key").chmod(0o644)
    with pytest.raises(WeakSecret, match="chmod 600"):
        session_secret(settings)


def test_the_old_development_constant_is_refused_everywhere(tmp_path: Path) -> None:
    for environment in ("development", "test", "production"):
        settings = Settings(home=tmp_path, environment=environment, secret_key=DEV_SECRET_KEY)
        with pytest.raises(WeakSecret, match="public development constant"):
            session_secret(settings)


@pytest.mark.parametrize("key", ["short-key", "x" * 64, "ab" * 32])
def test_production_refuses_weak_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(WeakSecret, match="weak"):
        session_secret(Settings(home=tmp_path, environment="production", secret_key=key))
    # Development takes what it is given (tests use short keys).
    assert session_secret(Settings(home=tmp_path, secret_key=key)) == key


def test_production_needs_a_key_and_reads_it_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(WeakSecret, match="required in production"):
        session_secret(Settings(home=tmp_path, environment="production"))
    assert not (tmp_path / "secret-key").exists()
    key_file = tmp_path / "key"
    key_file.write_text(RANDOM + "\n")
    settings = Settings(home=tmp_path, environment="production", secret_key_file=key_file)
    assert session_secret(settings) == RANDOM


def test_a_private_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "token"
    assert write_private_file(path, "first\n")
    assert not write_private_file(path, "second\n")  # never replaces another's file
    assert path.read_text() == "first\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temporary file left


def test_signing_keys_current_first_then_previous(tmp_path: Path) -> None:
    assert deployment_signing_keys(Settings()) == []
    key_file = tmp_path / "signing"
    key_file.write_text("from-a-file\n")
    settings = Settings(
        deployment_signing_key_file=key_file, deployment_signing_previous_key="old-key"
    )
    assert deployment_signing_keys(settings) == [b"from-a-file", b"old-key"]
    with pytest.raises(WeakSecret):
        deployment_signing_keys(Settings(environment="production", deployment_signing_key="abc"))


def test_a_record_is_accepted_only_under_its_name_and_with_a_valid_signature() -> None:
    value = b'{"name":"fraud","revision":3}'
    good = sign(b"k1", "fraud", value).encode()
    assert record_problem([], b"fraud", value, None, "fraud") is None
    assert "is not the deployment name" in str(record_problem([], b"other", value, None, "fraud"))
    assert "not signed" in str(record_problem([b"k1"], b"fraud", value, None, "fraud"))
    assert record_problem([b"k1"], b"fraud", value, good, "fraud") is None
    assert record_problem([b"k2", b"k1"], b"fraud", value, good, "fraud") is None  # rotation
    assert "does not verify" in str(record_problem([b"k2"], b"fraud", value, good, "fraud"))
    tampered = value.replace(b"3", b"4")
    assert "does not verify" in str(record_problem([b"k1"], b"fraud", tampered, good, "fraud"))
    # The key is signed too: the same bytes under another name do not verify.
    other = sign(b"k1", "fraud2", value).encode()
    assert record_problem([b"k1"], b"fraud", value, other, "fraud") is not None


def test_the_signature_header_is_read_once() -> None:
    assert header_value([(SIGNATURE_HEADER, b"x")]) == b"x"
    assert header_value([(SIGNATURE_HEADER, b"x"), (SIGNATURE_HEADER, b"y")]) is None
    assert header_value(None) is None


def test_the_admin_token_file_is_replaced_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text("old, readable by others\n")
    path.chmod(0o644)
    replace_private_file(path, "crr_new\n")
    assert path.read_text() == "crr_new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["admin-token"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90d", 90 * 86_400), ("12h", 43_200), ("30m", 1800), ("3600", 3600)]
)
def test_expiry_durations_are_read_like_people_write_them(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_a_bad_duration_is_refused() -> None:
    with pytest.raises(typer.BadParameter):
        parse_duration("soon")
