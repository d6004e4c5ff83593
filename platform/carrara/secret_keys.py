"""The secrets a process uses: read from the environment or a file, generated when missing
(development only), refused when weak in production. Never logged.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from carrara.settings import DEV_SECRET_KEY, Settings

SECRET_KEY_FILE = "secret-key"  # noqa: S105 - a file name under the stack home
MIN_KEY_LENGTH = 32
# A key of 32 characters drawn from fewer than this many distinct ones is not random.
MIN_DISTINCT_CHARACTERS = 10


class WeakSecret(ValueError):
    """A secret that must not be used (a public constant, too short, not random)."""


def read_secret(value: str, file: Path | None, name: str) -> str:
    """`value`, else the content of `file` (stripped); '' when neither is given."""
    if value:
        return value
    if file is None:
        return ""
    try:
        return file.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{name}_FILE cannot be read: {exc.strerror}") from None


def write_private_file(path: Path, content: str) -> bool:
    """Create `path` with `content`, mode 0600 from the start, atomically; False if it exists.

    The content is written to a private temporary file that is then linked into place, so no
    reader ever sees a partial file or a moment with wider permissions, and two processes
    racing to create it agree on one content (the loser gets False and reads the winner's).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if `path` exists: never replaces another process's file
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def replace_private_file(path: Path, content: str) -> None:
    """Write `path` (mode 0600) atomically, replacing any previous content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def check_strength(key: str, name: str) -> None:
    """WeakSecret unless `key` could be random: long enough, not a known constant."""
    if key == DEV_SECRET_KEY:
        raise WeakSecret(f"{name} is the public development constant; use a random value")
    if len(key) < MIN_KEY_LENGTH or len(set(key)) < MIN_DISTINCT_CHARACTERS:
        raise WeakSecret(
            f"{name} is weak: use at least {MIN_KEY_LENGTH} random characters "
            "(e.g. `openssl rand -hex 32`)"
        )


def session_secret(settings: Settings) -> str:
    """The key signing the UI's session cookies.

    Given (`CARRARA_SECRET_KEY` or `_FILE`): checked (the development constant is refused
    everywhere, a weak key in production). Not given: in production a refusal; elsewhere the key
    kept in `<home>/secret-key`, generated at random (mode 0600) on the first start.
    """
    given = read_secret(settings.secret_key, settings.secret_key_file, "CARRARA_SECRET_KEY")
    if given:
        if given == DEV_SECRET_KEY or settings.environment == "production":
            check_strength(given, "CARRARA_SECRET_KEY")
        return given
    if settings.environment == "production":
        raise WeakSecret(
            "CARRARA_SECRET_KEY (or CARRARA_SECRET_KEY_FILE) is required in production: "
            "every API process must share one random key"
        )
    path = settings.home / SECRET_KEY_FILE
    write_private_file(path, secrets.token_urlsafe(48) + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise WeakSecret(f"{path} is readable by others (mode {mode:o}); `chmod 600` it")
    key = path.read_text().strip()
    check_strength(key, str(path))
    return key


def deployment_signing_keys(settings: Settings) -> list[bytes]:
    """The keys deployment records are verified with: the current one first (it also signs),
    then the previous one during a rotation; empty when records are not signed."""
    current = read_secret(
        settings.deployment_signing_key,
        settings.deployment_signing_key_file,
        "CARRARA_DEPLOYMENT_SIGNING_KEY",
    )
    if not current:
        if settings.deployment_signing_previous_key:
            raise ValueError(
                "CARRARA_DEPLOYMENT_SIGNING_PREVIOUS_KEY needs CARRARA_DEPLOYMENT_SIGNING_KEY"
            )
        return []
    keys = [current]
    if settings.deployment_signing_previous_key:
        keys.append(settings.deployment_signing_previous_key)
    for key in keys:
        if settings.environment == "production":
            check_strength(key, "CARRARA_DEPLOYMENT_SIGNING_KEY")
    return [k.encode() for k in keys]
