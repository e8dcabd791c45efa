"""The file system of a path or URL, through fsspec, with errors a user can act on."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from infermill.errors import ConfigError, InfermillError, StorageError

#: fsspec's keyword arguments of a file system: a job file's ``input.storage_options`` and
#: ``output.storage_options`` (s3fs's for ``s3://``: ``key``, ``secret``, ``endpoint_url``, ``profile``...)
StorageOptions = Mapping[str, Any]

#: what a file system answers that retrying does not cure: a worker stops on it at once
LASTING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(where: str, action: str, error: OSError) -> StorageError:
    """A ``StorageError`` saying that ``action`` (e.g. "write it") failed on ``where`` (a path
    or URL), why in words, and what to do next for that kind of error."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device" if error.errno == errno.ENOSPC else "disk quota exceeded"
        hint = "free some space (or move the output), then run the same command to resume"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the file system is read-only" if error.errno == errno.EROFS else "permission denied"
        hint = "make it writable (or move the output), then run the same command to resume"
    else:
        why = f"{type(error).__name__}: {error}"
        hint = "check the URL, the credentials and the network"
    return StorageError(f"{where}: cannot {action}: {why}; {hint}")


def check_space(folder: str | os.PathLike[str], size: int = 64 * 1024) -> None:
    """Write ``size`` bytes to a file in the local ``folder`` and delete it: a ``StorageError``
    if that fails for a lasting reason (:data:`LASTING_ERRNOS`: a full disk, where an empty
    file can still be created; a read-only folder...). Other errors (a network file system's
    hiccup) are not this check's to judge: they pass."""
    probe = os.path.join(folder, f".infermill-space-test-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "wb") as file:
            file.write(b"\0" * size)
            file.flush()
            os.fsync(file.fileno())
    except OSError as e:
        if e.errno in LASTING_ERRNOS:
            raise storage_error(os.fspath(folder), "write to it", e) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def url_to_fs(url: str, options: StorageOptions | None = None) -> tuple[Any, str]:
    """fsspec's file system for ``url`` (made with ``options``) and the path in it. A backend that
    is not installed (``s3://`` without s3fs) or an unknown protocol is a ``ConfigError`` naming
    the URL and, where fsspec knows it, the package to install."""
    import fsspec  # here, not at the top: a job file names formats without paying for fsspec

    try:
        found: tuple[Any, str] = fsspec.core.url_to_fs(url, **(options or {}))
        return found
    except ImportError as e:
        raise ConfigError(f"{url}: {e} (pip install it into infermill's environment)") from None
    except ValueError as e:
        raise ConfigError(f"{url}: {e}; check the path") from None
    except TypeError as e:  # a storage option its file system does not take
        raise ConfigError(f"{url}: {e}; check its storage_options") from None


def open_file(url: str, options: StorageOptions | None, compression: str | None = None) -> Any:
    """``url`` to open for reading (``with open_file(...) as f``) in its file system, made with
    ``options``; decompressed by ``compression`` (``"infer"``: by its suffix). Closing it closes
    the decompressor and the file under it."""
    from fsspec.core import OpenFile

    fs, path = url_to_fs(url, options)
    return OpenFile(fs, path, "rb", compression=compression)


@contextlib.contextmanager
def reaching(url: str, action: str, not_storage: Collection[BaseException] = ()) -> Iterator[None]:
    """Turn an error of the file system behind ``url`` that does not name its file (a network
    failure, a backend's own exception: botocore, aiohttp, google-auth...) into a
    ``StorageError`` that names ``url`` and what was being done (``action``: "list", "write").
    Errors in ``not_storage`` (raised by the data being written, say) pass through as they are."""
    try:
        yield
    except InfermillError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.filename:  # already says which file
            raise
        if e in not_storage:
            raise
        if isinstance(e, OSError):  # e.g. a full local disk: says why, not "check the network"
            raise storage_error(url, f"{action} it", e) from e
        if isinstance(e, TypeError) and "keyword argument" in str(e):  # s3fs's client made with a wrong option
            raise StorageError(f"{url}: cannot {action} it: {e}: check its storage_options") from e
        raise StorageError(
            f"{url}: cannot {action} it: {type(e).__name__}: {e}; check the URL, the credentials and the network"
        ) from e


def check_writable(url: str, options: StorageOptions | None = None) -> None:
    """Write and delete a small file in the folder ``url``, so that a remote output that cannot be
    reached or written is found before a server is launched; a ``StorageError`` says why."""
    fs, root = url_to_fs(url, options)
    probe = f"{root.rstrip('/')}/.infermill-write-test-{uuid.uuid4().hex[:8]}"
    with reaching(url, "write to"):
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)


def replace_whole(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to the local file ``path`` whole or not at all: into a temporary file
    beside it (a name of its own: several processes may replace one file), renamed over
    ``path``; the temporary file is removed if writing fails (a full disk leaves no litter).
    ``fsync``: on disk before the rename."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
