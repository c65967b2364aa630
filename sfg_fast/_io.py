"""Atomic file writes, shared by the training job (checkpoints, results), the data package (feature
maps) and the diagnostics: no torch import, so the data package stays light."""
from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Tuple

__all__ = ["atomic_write", "atomic_write_bytes"]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _WriteErrors:
    """A file object that remembers the first OSError its ``write`` raised (``error``)."""

    def __init__(self, fh):
        self._fh, self.error = fh, None

    def write(self, data):
        try:
            return self._fh.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._fh, name)


io.IOBase.register(_WriteErrors)      # a file object to isinstance checks (torch.export.save warns otherwise)


def atomic_write(path: str, write) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename over it.

    A crash at any point leaves either the old file or the new one, never a torn file; the temp
    file is removed on failure.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            recorder = _WriteErrors(fh)
            try:
                write(recorder)
                fh.flush()
            except Exception as exc:
                # a full disk or a file-size limit, named with the file: torch.save's zip writer turns the
                # OSError of a failed write into an unrelated "unexpected pos" RuntimeError
                # (an OSError that names its own file, e.g. a source being copied, is left as it is)
                error = recorder.error or (exc if isinstance(exc, OSError) and exc.filename is None else None)
                if error is not None and error.errno is not None:
                    raise OSError(error.errno, error.strerror, path) from exc
                raise
            os.fsync(fh.fileno())
            # mkstemp creates 0600; the file gets the mode a plain open() would give it (umask applies)
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def remove_stale_temp_files(directory: str, prefixes: Tuple[str, ...], min_age_s: float = 0.0) -> None:
    """Delete the temp files of :func:`atomic_write` that a killed process never renamed (SIGKILL, a power cut):
    ``.<prefix>*.tmp`` in ``directory``, each up to the size of the file it was to become. With ``min_age_s``,
    only those untouched for that long: in a directory that several processes share (a data cache), a younger
    one may still be written."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for name in names:
        if not (name.startswith(prefixes) and name.endswith(".tmp")):
            continue
        path = os.path.join(directory, name)
        try:
            if min_age_s and now - os.stat(path).st_mtime < min_age_s:
                continue
            os.unlink(path)
        except OSError:
            pass


def remove_if_present(path: str) -> None:
    """Delete the file ``path``; one that is already gone is no error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_bytes(data: bytes, path: str) -> None:
    atomic_write(path, lambda fh: fh.write(data))
