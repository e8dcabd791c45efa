"""Where the work queue keeps its files: the few operations :class:`~infermill.queue.WorkQueue`
needs of a storage, each bounded by a timeout.

:class:`QueueStorage` is the seam: everything the queue does to its folder goes through one,
so that a storage that stops answering (a hung NFS mount) raises
:class:`StorageTimeoutError` in the queue instead of hanging its worker for ever while its
leases look alive. :class:`PosixQueueStorage` is a local or network POSIX file system (see
:mod:`infermill.queue`); :class:`~infermill.queue_storage_s3.S3QueueStorage` an S3 store with
conditional writes.

Each call runs in a daemon thread of :class:`TimedCalls` and is waited for at most
``timeout_sec``: a call that never returns leaves its thread behind, blocked, and that thread
does not keep the process from exiting. A call that timed out may still complete later (a
file created late): the queue's protocol tolerates that like a worker frozen for a while.
An event loop awaits such calls without blocking (:meth:`QueueStorage.run`). Appends (the
journals' lines) go to one ordered writer thread of the storage (:meth:`QueueStorage.append_later`),
whose caller bounds its wait.

``INFERMILL_QUEUE_STORAGE=package.module:factory`` makes every queue use the storage
``factory(timeout_sec)`` returns (the tests' stand-in for a hung mount uses it).
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import BinaryIO, TypeVar

from infermill.io.filesystems import replace_whole

T = TypeVar("T")

#: the environment variable naming a storage factory ``package.module:callable`` (see the module docstring)
STORAGE_ENV = "INFERMILL_QUEUE_STORAGE"
DEFAULT_STORAGE_TIMEOUT_SEC = 30.0
LINES_BLOCK_BYTES = 1 << 20  # what QueueStorage.lines reads at once


class StorageTimeoutError(OSError):
    """A storage call that did not answer within its timeout."""


def timed_out(timeout_sec: float, what: str) -> StorageTimeoutError:
    return StorageTimeoutError(errno.ETIMEDOUT, f"the storage did not answer within {timeout_sec:g} s", what)


def wait(future: Future[T], timeout_sec: float, what: str) -> T:
    """``future``'s value (or exception); ``StorageTimeoutError`` naming ``what`` if it is not
    done within ``timeout_sec``."""
    try:
        return future.result(timeout_sec)
    except FutureTimeout:
        raise timed_out(timeout_sec, what) from None


async def wait_async(future: Future[T], timeout_sec: float | None, what: str) -> T:
    """:func:`wait` on an event loop, without blocking it (``timeout_sec`` None: no limit). A
    call given up before its thread started it is not run."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_sec)
    except TimeoutError:
        raise timed_out(timeout_sec or 0.0, what) from None


def _run_into(function: Callable[[], object], future: Future[object]) -> None:
    if not future.set_running_or_notify_cancel():  # given up before it started: not run
        return
    try:
        future.set_result(function())
    except BaseException as e:  # handed to the caller, which raises it
        future.set_exception(e)


class TimedCalls:
    """Runs calls in daemon threads (started as needed, reused when idle) and waits for each
    at most a timeout."""

    def __init__(self, name: str):
        self._name = name
        self._work: SimpleQueue[tuple[Callable[[], object], Future[object]]] = SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for work, or about to
        self._started = 0

    def submit(self, function: Callable[[], T]) -> Future[T]:
        """Start ``function()`` in a thread; its future."""
        future: Future[T] = Future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self._started += 1
                name = f"{self._name}-{self._started}"
                threading.Thread(target=self._serve, name=name, daemon=True).start()
        self._work.put((function, future))  # type: ignore[arg-type]
        return future

    def call(self, function: Callable[[], T], timeout_sec: float, what: str) -> T:
        """``function()``'s value (or exception); ``StorageTimeoutError`` naming ``what`` if it
        takes longer than ``timeout_sec``."""
        return wait(self.submit(function), timeout_sec, what)

    def _serve(self) -> None:
        while True:
            function, future = self._work.get()
            _run_into(function, future)
            del function, future
            with self._lock:
                self._idle += 1


class OrderedCalls:
    """Runs calls one after the other, in the order submitted, in one daemon thread (started
    when needed, ended after ``idle_sec`` without work)."""

    def __init__(self, name: str, idle_sec: float = 10.0):
        self._name = name
        self._idle_sec = idle_sec
        self._work: SimpleQueue[tuple[Callable[[], object], Future[object]]] = SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, function: Callable[[], T]) -> Future[T]:
        """Run ``function()`` after every call submitted before; its future."""
        future: Future[T] = Future()
        with self._lock:
            self._work.put((function, future))  # type: ignore[arg-type]
            if not self._running:
                self._running = True
                threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            try:
                function, future = self._work.get(timeout=self._idle_sec)
            except Empty:
                with self._lock:
                    if self._work.empty():  # (else a call came in meanwhile: go on)
                        self._running = False
                        return
                continue
            _run_into(function, future)
            del function, future


_calls = TimedCalls("infermill-storage")  # shared: a hung thread is left behind, not one per queue


class QueueStorage:
    """The operations of the work queue's storage (paths are those of the queue's folder). Each
    raises ``StorageTimeoutError`` (an ``OSError``) when the storage does not answer within
    ``timeout_sec``, and the ``OSError`` of the storage otherwise."""

    local = True  # its paths are the machine's own (a disk's space can be checked)

    def __init__(self, timeout_sec: float = DEFAULT_STORAGE_TIMEOUT_SEC):
        self.timeout_sec = timeout_sec

    def where(self, path: Path) -> str:
        """``path`` as a user knows it (in errors)."""
        return str(path)

    def read(self, path: Path, size: int = -1, offset: int = 0) -> bytes:
        """The file's bytes from ``offset`` (``size`` of them at most, if given);
        ``FileNotFoundError`` if it is absent."""
        raise NotImplementedError

    def lines(self, path: Path) -> Iterator[bytes]:
        """The file's lines (a torn last one without its newline), read in blocks as they are
        consumed, each read bounded by the timeout: a unit's journal can be larger than memory
        should hold at once. Nothing if the file is absent; those read so far if it is deleted
        meanwhile."""
        offset, rest = 0, b""
        while True:
            try:
                block = self.read(path, LINES_BLOCK_BYTES, offset)
            except FileNotFoundError:
                break
            if not block:
                break
            offset += len(block)
            data, start = rest + block, 0
            while (end := data.find(b"\n", start)) >= 0:
                yield data[start : end + 1]
                start = end + 1
            rest = data[start:]
        if rest:
            yield rest

    def create_if_absent(self, path: Path, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists, atomically, complete or not at
        all; return whether this call created it."""
        raise NotImplementedError

    def replace(self, path: Path, data: bytes) -> None:
        """Store ``data`` as ``path``, in place of what it held if anything, atomically: a
        reader sees the old bytes or the new, whole."""
        raise NotImplementedError

    def delete(self, path: Path) -> None:
        """Delete ``path`` (nothing if it is absent)."""
        raise NotImplementedError

    def delete_appended(self, path: Path) -> None:
        """Delete the file ``path`` that :meth:`append_later` wrote (nothing if it is absent)."""
        self.delete(path)

    def delete_tree(self, folder: Path) -> None:
        """Delete ``folder`` and everything in it (nothing if it is absent)."""
        raise NotImplementedError

    def list(self, folder: Path) -> list[str]:
        """The names in ``folder``."""
        raise NotImplementedError

    def exists(self, path: Path) -> bool:
        raise NotImplementedError

    def mtime(self, path: Path) -> float | None:
        """When ``path`` was last touched, on the storage's clock; None if it is absent."""
        raise NotImplementedError

    def touch(self, path: Path) -> bool:
        """Date ``path`` to the storage's present, its bytes unchanged; False if it is absent."""
        raise NotImplementedError

    def now(self, clock: Path) -> float:
        """The storage's current time, read by touching the file ``clock`` (created if absent)."""
        raise NotImplementedError

    def make_folder(self, folder: Path) -> None:
        raise NotImplementedError

    def append_later(self, appends: Sequence[tuple[Path, bytes]], closing: Iterable[Path] = ()) -> Future[None]:
        """Hand ``appends`` (each: append the bytes to the file, created if absent) to the
        storage's one writer, behind every append handed over before, then close the files
        ``closing`` (a writer may keep a file open between appends). Not waited for: the future
        is done once they all reached the storage (the OS); its caller bounds its wait by
        ``timeout_sec``. After an append that failed, every later one fails with the same error
        and writes nothing: no line lands after a torn one."""
        raise NotImplementedError

    def append(self, path: Path, data: bytes) -> None:
        """Append ``data`` to ``path`` (created if absent), in order with :meth:`append_later`."""
        wait(self.append_later([(path, data)]), self.timeout_sec, str(path))

    async def run(self, function: Callable[[], T], what: str, bounded: bool = True) -> T:
        """``function()`` (file I/O: calls of this storage) in a daemon thread, awaited on the
        event loop without blocking it; with ``bounded``, at most ``timeout_sec`` (else
        ``StorageTimeoutError`` naming ``what``, and the call is left behind). Unbounded: for a
        sequence of calls that are each bounded, with other I/O between them (a unit's output)."""
        return await wait_async(_calls.submit(function), self.timeout_sec if bounded else None, what)


class PosixQueueStorage(QueueStorage):
    """A local or network POSIX file system (see :mod:`infermill.queue` for what it must offer)."""

    def __init__(self, timeout_sec: float = DEFAULT_STORAGE_TIMEOUT_SEC):
        super().__init__(timeout_sec)
        self._writer = OrderedCalls("infermill-appends")
        # the writer thread's alone: the files appended to, kept open; its first failure
        self._appending: dict[Path, BinaryIO] = {}
        self._append_failure: BaseException | None = None

    def _call(self, function: Callable[[], T], what: Path) -> T:
        return _calls.call(function, self.timeout_sec, str(what))

    def read(self, path: Path, size: int = -1, offset: int = 0) -> bytes:
        def read() -> bytes:
            with open(path, "rb") as file:
                if offset:
                    file.seek(offset)
                return file.read(size)

        return self._call(read, path)

    def create_if_absent(self, path: Path, data: bytes) -> bool:
        return self._call(lambda: _create_if_absent(path, data), path)

    def replace(self, path: Path, data: bytes) -> None:
        self._call(lambda: replace_whole(path, data), path)

    def delete(self, path: Path) -> None:
        self._call(lambda: _absent_is_false(os.unlink, path), path)

    def list(self, folder: Path) -> list[str]:
        return self._call(lambda: os.listdir(folder), folder)

    def delete_tree(self, folder: Path) -> None:
        self._call(lambda: shutil.rmtree(folder, ignore_errors=True), folder)

    def exists(self, path: Path) -> bool:
        return self._call(path.exists, path)

    def mtime(self, path: Path) -> float | None:
        return self._call(lambda: _opened_mtime(path), path)

    def touch(self, path: Path) -> bool:
        return self._call(lambda: _absent_is_false(os.utime, path, None), path)

    def now(self, clock: Path) -> float:
        def now() -> float:
            try:
                os.utime(clock, None)
            except FileNotFoundError:
                with open(clock, "ab"):
                    pass
                os.utime(clock, None)
            return os.stat(clock).st_mtime

        return self._call(now, clock)

    def make_folder(self, folder: Path) -> None:
        self._call(lambda: folder.mkdir(parents=True, exist_ok=True), folder)

    def append_later(self, appends: Sequence[tuple[Path, bytes]], closing: Iterable[Path] = ()) -> Future[None]:
        return self._writer.submit(lambda: self._append_now(appends, closing))

    def _append_now(self, appends: Sequence[tuple[Path, bytes]], closing: Iterable[Path]) -> None:
        """In the writer thread."""
        files = self._appending
        try:
            if self._append_failure is not None:
                raise self._append_failure
            for path, data in appends:
                file = files.get(path)
                if file is None:
                    file = files[path] = open(path, "ab", buffering=0)  # noqa: SIM115 (closed when asked)
                _write_all(file, data, path)
        except BaseException as e:
            self._append_failure = self._append_failure or e
            raise
        finally:
            for path in closing:
                file = files.pop(path, None)
                if file is not None:
                    file.close()


def _write_all(file: BinaryIO, data: bytes, path: Path) -> None:
    """Write all of ``data`` (an unbuffered write may take part of it)."""
    view = memoryview(data)
    try:
        while view:
            view = view[file.write(view) :]
    except OSError as e:  # a write's error names no file (a full disk): name the one written
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _absent_is_false(function: Callable[..., object], *args: object) -> bool:
    try:
        function(*args)
    except FileNotFoundError:
        return False
    return True


def _create_if_absent(path: Path, data: bytes) -> bool:
    """Write a unique temp file, then ``link`` it to ``path``."""
    temp = path.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        try:
            with open(temp, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except OSError as e:  # a write's error names no file (a full disk): name the one being made
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror, str(path)) from e
        try:
            os.link(temp, path)
        except FileExistsError:
            # NFS: a retransmitted link whose first try succeeded answers EEXIST; our temp file
            # then has a second name
            return os.stat(temp).st_nlink == 2
        return True
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass


def _opened_mtime(path: Path) -> float | None:
    """Opened, not only stat'ed: NFS revalidates a file's attributes when it is opened
    (close-to-open), where a stat may answer from its attribute cache."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def default_storage(timeout_sec: float) -> QueueStorage:
    """The storage a queue uses unless given one: ``INFERMILL_QUEUE_STORAGE``'s, else POSIX."""
    factory = os.environ.get(STORAGE_ENV)
    if not factory:
        return PosixQueueStorage(timeout_sec)
    module, _, name = factory.partition(":")
    storage = getattr(importlib.import_module(module), name)(timeout_sec)
    if not isinstance(storage, QueueStorage):
        raise TypeError(f"{STORAGE_ENV}={factory} returned {storage!r}, not a QueueStorage")
    return storage
