"""The one way files are written: atomically (temporary file, fsync, rename), so a crash leaves the
old content or the new one, never a torn file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fcmoe.errors import ConfigError


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_folder(folder: Path, key: str) -> None:
    """ConfigError (one line naming ``key``) unless ``folder`` is, or can be made, a folder this
    process may write in. Start-up checks run before anything on disk changes, so the probe is a
    temporary folder in the nearest existing ancestor, removed at once: no trace is left."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} = {folder}: {existing} is a file, not a folder; choose a path inside a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fcmoe-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"{key} = {folder}: cannot create files in {existing} ({exc.strerror}); choose a folder "
                          "this user may write") from None
