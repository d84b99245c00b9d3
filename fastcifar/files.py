"""Files that survive crashes: atomic writes, and JSON-lines files whose torn last line is repaired, not fatal.

Torch-free, so `fastcifar report` and the CLI's checks stay light.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from fastcifar import FastCifarError

_UMASK = 0o022


def refresh_umask() -> None:
    """Read the process umask (only possible by setting it) while no other thread can create files."""
    global _UMASK
    _UMASK = os.umask(0o022)
    os.umask(_UMASK)


refresh_umask()
_TEMP = re.compile(r"^\.(.+)\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like


class CannotWrite(FastCifarError):
    """A run file could not be written (made read-only, a read-only filesystem, ...): one line naming it."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        super().__init__(f"cannot write {self.path}: {reason}")


class NoSpace(CannotWrite):
    """The disk is full (or over quota): what could not be written and how much it needed."""

    def __init__(self, path: Path, needed: int | None):
        self.needed = needed
        folder = Path(path).parent
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        need = f"it needs {needed / 1e6:,.1f} MB, " if needed else ""
        super().__init__(path, f"no space left on device ({need}{free / 1e6:,.1f} MB free)")


def _write_error(path: Path, exc: OSError, size: int | None) -> CannotWrite:
    if _is_disk_full(exc):
        return NoSpace(path, size)
    return CannotWrite(path, (exc.strerror or str(exc)).lower())


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path` (mode 0666 minus the umask, like any other file of the run),
    fsync it, rename it over `path`, fsync the folder. A crash at any moment leaves the old file whole."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc, len(data)) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: give it the mode any other file of the run gets
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(path, exc, len(data)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temp files left by a write that was killed (a checkpoint's is 35-134 MB): removed when the run restarts."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if _TEMP.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _json_default(obj):
    return obj.item() if hasattr(obj, "item") else str(obj)


def clean(value):
    """JSON has no NaN/Inf: store them as null so every row stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def dumps(obj, indent: int | None = None) -> str:
    return json.dumps(clean(obj), default=_json_default, allow_nan=False, indent=indent)


def append_lines(path: Path, rows: list[dict]) -> None:
    """Append rows, one JSON object per line, in one write, flushed and fsynced."""
    if not rows:
        return
    text = "".join(dumps(r) + "\n" for r in rows)
    try:
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _write_error(path, exc, len(text)) from None


def read_jsonl(path: Path, notice=None) -> list[dict]:
    """The rows of a JSON-lines file ([] when absent). A last line cut short by a crash or a full disk is dropped
    (with a `notice`); any other unreadable line is one FastCifarError naming the file and the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise FastCifarError(f"cannot read {path} ({exc.strerror or exc}).") from None
    lines = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            if number == len(lines):  # no newline after it: a write that did not finish
                if notice:
                    notice(f"note: {path}: dropped its last line, cut short by a crash or a full disk "
                           f"({len(line)} bytes)")
                continue
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
            raise FastCifarError(f"{path} is damaged: line {number} is {reason}. Restore the file or remove "
                                 f"it (it is the run's record, not its weights).") from None
        if not isinstance(row, dict):
            raise FastCifarError(f"{path} is damaged: line {number} is not a JSON object.")
        rows.append(row)
    return rows
