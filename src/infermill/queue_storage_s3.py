"""The work queue's storage on an S3-compatible object store that honours conditional writes
(AWS S3, SeaweedFS, MinIO, Ceph RGW...), through obstore (Rust's ``object_store``).

A path of the queue is a key of the store (``Path("prefix/_infermill/queue/units/...")``
is the key ``prefix/_infermill/queue/units/...``). The queue's operations map to requests:

- create if absent: ``PUT`` with ``If-None-Match: *`` (the store answers 412 to all but one writer);
- replace: ``PUT``; read: ``GET`` (with a range for part of an object); exists, date: ``HEAD``
  (``Last-Modified``: whole seconds); delete: ``DELETE``; list: ``LIST`` with a delimiter;
- touch (a lease renewed): ``GET``, then ``PUT`` of the same bytes with ``If-Match`` its ETag:
  it fails, and the renewal with it, if the lease was deleted or replaced meanwhile;
- the store's time: ``PUT`` of the ``clock`` object, then ``HEAD`` for its ``Last-Modified``.

An object cannot be appended to: a journal ``J`` is the objects ``J/00000000``, ``J/00000001``...
(segments), each a batch of its lines. One writer thread uploads them in order; lines handed
over within ``flush_interval_sec`` of the last upload wait for the next one, so a busy worker
sends about one ``PUT`` per journal and interval, not one per document. A journal's reader
lists its segments and reads them in order; a listing of the journals' folder names ``J``.
"""

from __future__ import annotations

import collections
import errno
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from infermill.errors import ConfigError
from infermill.queue_storage import DEFAULT_STORAGE_TIMEOUT_SEC, QueueStorage, TimedCalls

if TYPE_CHECKING:
    from obstore.store import S3Store

    from infermill.io.filesystems import StorageOptions

T = TypeVar("T")
DEFAULT_FLUSH_INTERVAL_SEC = 1.0
CREDENTIALS_TTL = timedelta(minutes=5)  # how long obstore keeps credentials from botocore before asking again
SEGMENT_DIGITS = 8

_calls = TimedCalls("infermill-s3")
_requests: collections.Counter[str] = collections.Counter()  # sent by this process, per HTTP method
_counting = threading.Lock()


def requests_sent() -> dict[str, int]:
    """The requests this process sent to S3 stores so far, per HTTP method (what a store bills)."""
    with _counting:
        return dict(_requests)


def _key(path: Path) -> str:
    return path.as_posix().lstrip("/")  # (the store's keys have no leading slash)


class S3QueueStorage(QueueStorage):
    """The queue on ``store`` (an obstore ``S3Store``; its own prefix, if any, comes first),
    named ``url`` in errors. Each operation raises ``FileNotFoundError`` for an absent object,
    ``StorageTimeoutError`` when the store does not answer in time, and another ``OSError``
    (its first line) when the store refuses or cannot be reached."""

    local = False

    def __init__(
        self,
        store: S3Store,
        timeout_sec: float = DEFAULT_STORAGE_TIMEOUT_SEC,
        flush_interval_sec: float = DEFAULT_FLUSH_INTERVAL_SEC,
        url: str | None = None,
    ):
        super().__init__(timeout_sec)
        import obstore

        self._obstore = obstore
        self.store = store
        self.url = url or f"s3://{store.config.get('bucket', '?')}"
        self._segments = _SegmentWriter(self, flush_interval_sec)

    # -- requests: each one counted ---------------------------------------------------------------

    @staticmethod
    def _count(method: str) -> None:
        with _counting:
            _requests[method] += 1

    def _get(self, key: str) -> Any:
        self._count("GET")
        return self._obstore.get(self.store, key)

    def _get_range(self, key: str, start: int, length: int) -> bytes:
        self._count("GET")
        return bytes(self._obstore.get_range(self.store, key, start=start, length=length))

    def _put(self, key: str, data: bytes, mode: Any = None) -> Any:
        self._count("PUT")
        return self._obstore.put(self.store, key, data, mode=mode)

    def _head(self, key: str) -> Any:
        self._count("HEAD")
        return self._obstore.head(self.store, key)

    def _delete(self, key: str) -> None:
        self._count("DELETE")
        try:
            self._obstore.delete(self.store, key)
        except FileNotFoundError:  # (S3 answers 204 either way; other stores may not)
            pass

    def _list(self, prefix: str) -> Any:
        self._count("LIST")
        return self._obstore.list_with_delimiter(self.store, prefix)

    def where(self, path: Path) -> str:
        return f"{self.url}/{_key(path)}"

    def _call(self, function: Callable[[], T], what: Path) -> T:
        where = self.where(what)

        def call() -> T:
            try:
                return function()
            except FileNotFoundError:
                raise
            except self._obstore.exceptions.BaseError as e:  # (its message: pages of a Rust Debug dump)
                raise OSError(errno.EIO, str(e).splitlines()[0][:300], where) from None

        return _calls.call(call, self.timeout_sec, where)

    # -- objects ----------------------------------------------------------------------------

    def read(self, path: Path, size: int = -1, offset: int = 0) -> bytes:
        key = _key(path)

        def read() -> bytes:
            if size < 0 and not offset:
                return bytes(self._get(key).bytes())
            length = int(self._head(key)["size"]) - offset if size < 0 else size
            if length <= 0:
                return b""
            try:
                return self._get_range(key, offset, length)
            except self._obstore.exceptions.GenericError:  # a range past the end (the object shrank: replaced)
                return bytes(self._get(key).bytes())[offset : offset + length]

        return self._call(read, path)

    def create_if_absent(self, path: Path, data: bytes) -> bool:
        return self._call(lambda: self._create(_key(path), data), path)

    def _create(self, key: str, data: bytes) -> bool:
        """``PUT`` with ``If-None-Match: *``. A 412 may answer a retry of this very PUT, whose first
        try was stored but whose answer was lost (obstore retries a 5xx or a dropped connection):
        the object then holds these bytes (each caller's are its own: a worker, a pid, a time)."""
        try:
            self._put(key, data, mode="create")
        except self._obstore.exceptions.AlreadyExistsError:
            try:
                return bytes(self._get(key).bytes()) == data
            except FileNotFoundError:  # (deleted since)
                return False
        return True

    def replace(self, path: Path, data: bytes) -> None:
        self._call(lambda: self._put(_key(path), data), path)

    def delete(self, path: Path) -> None:
        self._call(lambda: self._delete(_key(path)), path)

    def list(self, folder: Path) -> list[str]:
        prefix = _key(folder).rstrip("/") + "/"

        def names() -> list[str]:
            listed = self._list(prefix)
            objects = [entry["path"][len(prefix) :] for entry in listed["objects"]]
            folders = [entry[len(prefix) :].rstrip("/") for entry in listed["common_prefixes"]]
            return [name for name in objects + folders if name]  # (a folder's own marker, on some stores)

        return self._call(names, folder)

    def exists(self, path: Path) -> bool:
        return self.mtime(path) is not None

    def mtime(self, path: Path) -> float | None:
        def mtime() -> float | None:
            try:
                meta = self._head(_key(path))
            except FileNotFoundError:
                return None
            return float(meta["last_modified"].timestamp())

        return self._call(mtime, path)

    def touch(self, path: Path) -> bool:
        key = _key(path)

        def touch() -> bool:
            try:
                found = self._get(key)
                data, etag = bytes(found.bytes()), found.meta["e_tag"]
                self._put(key, data, mode={"e_tag": etag} if etag else "overwrite")
            except (FileNotFoundError, self._obstore.exceptions.PreconditionError):
                return False  # deleted or replaced since: not this caller's any more
            return True

        return self._call(touch, path)

    def now(self, clock: Path) -> float:
        key = _key(clock)

        def now() -> float:
            self._put(key, b"")
            return float(self._head(key)["last_modified"].timestamp())

        return self._call(now, clock)

    def make_folder(self, folder: Path) -> None:
        """Nothing: an object store has no folders."""

    # -- journals: appended as segments ---------------------------------------------------------

    def append_later(self, appends: Sequence[tuple[Path, bytes]], closing: Iterable[Path] = ()) -> Future[None]:
        return self._segments.submit(appends, closing)

    def lines(self, path: Path) -> Iterator[bytes]:
        """The lines of the journal ``path``, segment after segment (an object that is not a
        journal: its lines)."""
        segments = sorted(self.list(path))
        if not segments:
            try:
                yield from self.read(path).splitlines(keepends=True)
            except FileNotFoundError:
                pass
            return
        for name in segments:
            try:
                yield from self.read(path / name).splitlines(keepends=True)
            except FileNotFoundError:  # deleted meanwhile (committed by another holder): those read so far
                return

    def delete_tree(self, folder: Path) -> None:
        prefix = _key(folder).rstrip("/") + "/"

        def keys() -> list[str]:
            self._count("LIST")
            return [entry["path"] for chunk in self._obstore.list(self.store, prefix) for entry in chunk]

        found = self._call(keys, folder)
        for start in range(0, len(found), 1000):  # (one DeleteObjects request per 1,000 keys)
            batch = found[start : start + 1000]
            self._count("POST")  # (DeleteObjects: billed as a PUT is)
            self._call(functools.partial(self._obstore.delete, self.store, batch), folder)

    def delete_appended(self, path: Path) -> None:
        self.delete_tree(path)  # its segments
        self.delete(path)

    def check_conditional_writes(self, folder: Path, where: str) -> None:
        """Refuse (``ConfigError`` naming ``where``) a store that does not honour conditional
        writes: a probe object created twice with ``If-None-Match: *`` must be refused the second
        time, and a replace conditional on a stale ETag must be refused."""
        obstore, probe = self._obstore, folder / f".probe-{uuid.uuid4().hex}"
        key = _key(probe)

        def lacks() -> str | None:
            try:
                first = obstore.put(self.store, key, b"1", mode="create")
                try:
                    obstore.put(self.store, key, b"2", mode="create")
                    return "a second PUT with If-None-Match: * of one key succeeded"
                except obstore.exceptions.AlreadyExistsError:
                    pass
                if not (etag := first["e_tag"]):
                    return "it gives objects no ETag"
                obstore.put(self.store, key, b"3", mode={"e_tag": etag})
                try:
                    obstore.put(self.store, key, b"4", mode={"e_tag": etag})
                    return "a PUT with If-Match of an ETag replaced since succeeded"
                except obstore.exceptions.PreconditionError:
                    return None
            except obstore.exceptions.NotSupportedError as e:
                return f"it does not support conditional PUT ({e})"
            finally:
                try:
                    obstore.delete(self.store, key)
                except FileNotFoundError:
                    pass

        missing = self._call(lacks, probe)
        if missing is not None:
            raise ConfigError(
                f"the object store of {where} does not honour conditional writes: {missing}. The work queue needs "
                "them to give each unit to one worker; use a store that has them (AWS S3, SeaweedFS, MinIO, Ceph "
                "RGW...), or put checkpoint.dir on a file system every worker mounts"
            )

    def _upload_segment(self, path: Path, number: int, data: bytes) -> None:
        key = f"{_key(path)}/{number:0{SEGMENT_DIGITS}d}"
        if not self._call(lambda: self._create(key, data), path):
            raise OSError(errno.EEXIST, "a segment of this journal was written by another writer", self.where(path))


class _SegmentWriter:
    """The one thread that uploads journal segments, in the order their lines were handed over
    (started when needed, ended after ``idle_sec`` without work)."""

    def __init__(self, storage: S3QueueStorage, interval_sec: float, idle_sec: float = 10.0):
        self._idle_sec = idle_sec
        self._storage = storage
        self._interval_sec = interval_sec
        self._changed = threading.Condition()
        self._pending: dict[Path, list[bytes]] = {}  # lines not uploaded yet, per journal
        self._waiting: list[Future[None]] = []  # done once their lines are uploaded
        self._urgent = False  # a journal is closed (a commit waits): upload at once
        self._next: dict[Path, int] = {}  # the next segment of each journal
        self._failure: BaseException | None = None
        self._last_upload = 0.0
        self._thread: threading.Thread | None = None

    def submit(self, appends: Sequence[tuple[Path, bytes]], closing: Iterable[Path]) -> Future[None]:
        future: Future[None] = Future()
        with self._changed:
            if self._failure is not None:  # no line lands after one that failed
                future.set_exception(self._failure)
                return future
            for path, data in appends:
                if data:
                    self._pending.setdefault(path, []).append(data)
            self._waiting.append(future)
            self._urgent = self._urgent or bool(list(closing))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="infermill-s3-journals", daemon=True)
                self._thread.start()
            self._changed.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._changed.wait_for(lambda: bool(self._waiting), timeout=self._idle_sec):
                    self._thread = None  # (a submit under this lock starts another)
                    return
                delay = self._last_upload + self._interval_sec - time.monotonic()
                if delay > 0 and not self._urgent:
                    self._changed.wait_for(lambda: self._urgent, timeout=delay)
                pending, waiting = self._pending, self._waiting
                self._pending, self._waiting, self._urgent = {}, [], False
            waiting = [future for future in waiting if future.set_running_or_notify_cancel()]  # (else given up)
            error = self._failure if self._failure is not None else self._upload(pending)
            self._last_upload = time.monotonic()
            for future in waiting:
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _upload(self, pending: dict[Path, list[bytes]]) -> BaseException | None:
        try:
            for path, parts in pending.items():
                number = self._next.get(path, 0)
                self._storage._upload_segment(path, number, b"".join(parts))
                self._next[path] = number + 1
        except BaseException as e:
            with self._changed:
                self._failure = self._failure or e
            return e
        return None


def store_config(options: StorageOptions) -> tuple[dict[str, Any], str | None, dict[str, Any] | None]:
    """obstore's S3 config from s3fs's storage ``options`` (``endpoint_url``, ``client_kwargs:
    {endpoint_url, region_name}``, ``anon``), the ``profile`` they name, and the credentials they
    give (``key``, ``secret``, ``token``), if any."""
    config: dict[str, Any] = {}
    client = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        config["endpoint"] = str(endpoint)
    if client.get("region_name"):
        config["region"] = str(client["region_name"])
    if options.get("anon"):
        config["skip_signature"] = True
    profile = options.get("profile")
    credentials = None
    if options.get("key"):
        credentials = {
            "access_key_id": str(options["key"]),
            "secret_access_key": str(options.get("secret") or ""),
            "token": str(options["token"]) if options.get("token") else None,  # (none: not the environment's)
            "expires_at": None,
        }
    return config, str(profile) if profile else None, credentials


def open_store(url: str, options: StorageOptions | None = None) -> S3Store:
    """An obstore ``S3Store`` for ``s3://bucket[/prefix]``. Which store and as whom: from s3fs's
    storage ``options`` (a job file's ``output.storage_options``: :func:`store_config`) where they
    say (their credentials whole: nothing of them from the environment), else from the environment
    (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``...), the credentials from
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, else as botocore finds them (the options'
    ``profile`` or ``AWS_PROFILE``, ``~/.aws``, SSO, roles: the profile's region too), as s3fs does
    for the job's files; plain HTTP allowed for an ``http://`` endpoint (a store on the local
    network). ``ConfigError`` for a profile that does not exist."""
    import os

    from obstore.store import S3Store

    config, profile, credentials = store_config(options or {})
    endpoint = str(config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or "")
    client_options = {"allow_http": True} if endpoint.startswith("http://") else None
    provider: Any = None
    if credentials is not None:
        provider = functools.partial(dict, credentials)  # as given, always (never expiring)
    elif not config.get("skip_signature"):
        if profile is not None or not os.environ.get("AWS_ACCESS_KEY_ID"):
            provider = _BotocoreCredentials.found(profile)
        region = provider.region if provider is not None else None
        if region and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            config.setdefault("region", region)
    return S3Store.from_url(
        url,
        config=config or None,  # type: ignore[arg-type]
        client_options=client_options,  # type: ignore[arg-type]
        credential_provider=provider,
    )


class _BotocoreCredentials:
    """obstore's credentials from botocore's chain (the one s3fs uses), renewed as botocore renews
    them: obstore asks again every :data:`CREDENTIALS_TTL`, and botocore refreshes temporary
    credentials well before they expire."""

    def __init__(self, credentials: Any, region: str | None):
        self._credentials = credentials
        self.region = region

    @classmethod
    def found(cls, profile: str | None = None) -> _BotocoreCredentials | None:
        """From botocore's chain (of ``profile``, if given); None where botocore is missing or
        finds none (obstore's own chain then: instance metadata...)."""
        try:
            import botocore.exceptions
            import botocore.session
        except ImportError:
            return None
        session = botocore.session.Session(profile=profile)
        try:
            credentials = session.get_credentials()
            region = session.get_config_variable("region")
        except botocore.exceptions.ProfileNotFound as e:
            where = "output.storage_options.profile" if profile else "AWS_PROFILE"
            raise ConfigError(f"{e}: name a profile of ~/.aws/config or ~/.aws/credentials in {where}") from None
        return None if credentials is None else cls(credentials, region)

    def __call__(self) -> dict[str, Any]:
        frozen = self._credentials.get_frozen_credentials()
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + CREDENTIALS_TTL,
        }
