"""Writing outputs so that nothing half-written looks complete: temporary file, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def check_writable(path: Path) -> Path:
    """Fail before any work if file `path` cannot be created (missing, read-only or not a folder)."""
    path = Path(path)
    _probe(_file_folder(path), path)
    return path


def _file_folder(path: Path) -> Path:
    """The folder file `path` goes into, checked to be one."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"output path {path} is a directory: give a file name")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    return parent


def check_creatable_dir(path: Path) -> Path:
    """Fail before any work if folder `path` can neither be written into nor created. Missing parents
    are fine when the nearest existing one is a writable folder; nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} is a file: give a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" ends the chain
    if not existing.is_dir():
        raise UserError(f"cannot create {path}: {existing} is a file, not a folder")
    _probe(existing, path)
    return path


def _probe(folder: Path, target: Path) -> None:
    """Create and remove a temporary folder in `folder`: permission bits lie to root and on read-only
    or virtual file systems (/proc), so only trying tells."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".ziplm-write-check-"))
    except OSError as err:
        raise UserError(f"cannot write {target}: folder {folder} is not writable ({err.strerror or err})") from None


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    try:  # creating the temporary file is the write check
        fd, tmp = tempfile.mkstemp(dir=_file_folder(path), prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path}: folder {path.parent} is not writable ({err.strerror or err})") from None
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def usual_permissions(folder: Path) -> None:
    """Give a folder built under a temporary name (mkdtemp: 0700) and everything in it the permissions
    the user's umask gives new files and folders, as if each had been created in place."""
    mask = _umask()
    for path in (Path(folder), *Path(folder).rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_cache_dir(cache_dir: Path) -> None:
    """Refuse a cache folder that can never be one, before any work: a file at or above it. (A folder that
    cannot be written only costs the next run a rebuild, with a warning.)"""
    existing = next((p for p in (cache_dir, *cache_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == cache_dir else f"is inside {existing}, which is a file"
        raise UserError(f"--cache-dir {cache_dir} {where}: give a folder for the level-database cache "
                        "(made if missing)")
