"""The request cache (``cache: {path}``): replies kept across jobs, keyed by a fingerprint of
the request as sent, so that a rerun, or a new job whose requests are partly unchanged, sends
only the requests it has no reply to.

**Key.** The BLAKE2b digest (16 bytes) of the endpoint path (chat or completions) and of the
request body as sent, keys sorted: the model, the messages or prompt, every sampling setting,
``response_format``'s schema; and what answers it beyond the body (the config's
``reply_identity``: the server type, a launched server's model_kwargs but its runtime flags, an
endpoint's URL). Not the API key. A request that samples (``temperature`` absent or above 0) is keyed also by its
document's id, its sample (``rollouts_per_document`` index) and how many identical requests
that sample sent before it: each sample is an entry of its own, a rerun gets the same samples,
and two documents that happen to send the same prompt get samples of their own. At
``temperature: 0`` identical requests share one entry, whatever their document.

**Layout.** ``PATH/segments/*.seg``: immutable files, each written whole by one worker run (a
temporary file renamed, on POSIX; one PUT, on an object store) and never changed: any number
of workers on any number of nodes write side by side without locks, and a kill leaves at most
a temporary file (``.*.tmp``) that readers ignore. A worker publishes what it stored before
each unit it commits (so an entry stored before a unit's commit is there after it) and when
its run ends. A segment is a header (magic, entry count), an index (key, offset, length per
entry), then each entry's key and reply (JSON, as the server sent it); a run reads every
segment's header and index when it starts (not the replies: a hit reads its one reply, and
checks its whole key), and keeps them as arrays sorted by the keys' first 8 bytes (~60 bytes
an entry: see benchmarks/README.md). Entries other workers publish during a run are seen at
its next publish (its next unit's commit): a job's workers share their replies unit by unit;
only identical requests that two workers send at the same moment are both sent. Deleting the
folder clears the cache.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import hashlib
import logging
import os
import struct
import time
import uuid
from array import array
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from infermill.errors import ConfigError, InfermillError, StorageError

logger = logging.getLogger("infermill.cache")

_MAGIC = b"IMRCACH2"
_HEADER = struct.Struct("<8sI")  # magic, entries
_ENTRY = struct.Struct("<16sQI")  # key, offset in the replies, length (of the key and the reply there)
_PREFIX_ENTRY = struct.Struct("<Q8xQI")  # the same, the key's first 8 bytes as an integer, the rest skipped
KEY_BYTES = 16
#: what a run reads first of each segment: its whole index, unless it holds over ~2,300 entries
_FIRST_READ = 64 * 1024
SEGMENTS = "segments"
SUFFIX = ".seg"


def request_bytes(body: dict[str, Any], path: str) -> bytes:
    """The request as the cache keys it: the endpoint ``path`` and ``body``, keys sorted."""
    return orjson.dumps([path, body], option=orjson.OPT_SORT_KEYS)


def samples(body: dict[str, Any]) -> bool:
    """Whether a request with ``body`` samples: its ``temperature`` is absent (a server's own
    default samples) or above 0."""
    temperature = body.get("temperature")
    return not (isinstance(temperature, int | float) and temperature <= 0)


def fingerprint(request: bytes, sample: tuple[str, int, int] | None = None, server: bytes = b"") -> bytes:
    """The key of ``request`` (:func:`request_bytes`); ``sample``: (document id, sample index,
    repeat) of a request that samples; ``server``: what answers it, beyond the request (the
    config's :meth:`~infermill.config.InferenceConfig.reply_identity`: its model_kwargs, an
    endpoint's URL...)."""
    digest = hashlib.blake2b(request, digest_size=KEY_BYTES)
    if server:
        digest.update(b"\x1e" + server)
    if sample is not None:
        digest.update(b"\x1f" + orjson.dumps(sample))
    return digest.digest()


#: finish reasons of a generation that did not end as the model would (SGLang's abort, a server's
#: error): such a reply is used once, never stored
UNFINISHED = frozenset({"abort", "error", "cancelled", "canceled"})


def storable(finish_reason: object) -> bool:
    """Whether a reply that ended so is kept: one that stopped, hit its length, called a tool
    (or said nothing of it), not one aborted or failed."""
    return finish_reason is None or (isinstance(finish_reason, str) and finish_reason not in UNFINISHED)


def encode_segment(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A segment holding ``entries`` (key, reply): each reply stored after its key, so that a
    hit checks the whole key (the index in memory holds its first 8 bytes)."""
    index = bytearray()
    data: list[bytes] = []
    offset = 0
    for key, reply in entries:
        index += _ENTRY.pack(key, offset, KEY_BYTES + len(reply))
        data += (key, reply)
        offset += KEY_BYTES + len(reply)
    return b"".join([_HEADER.pack(_MAGIC, len(data) // 2), bytes(index), *data])


def decode_index(head: bytes, size: int, read: Callable[[int, int], bytes]) -> tuple[int, bytes]:
    """Where a segment's replies start, and its index (:data:`_ENTRY` after each other), from
    its first bytes ``head``, its ``size`` and ``read(start, length)`` for the rest of its index;
    ``ValueError`` if it is no whole segment."""
    if len(head) < _HEADER.size:
        raise ValueError("shorter than a segment's header")
    magic, count = _HEADER.unpack_from(head)
    if magic != _MAGIC:
        raise ValueError("not a segment of infermill's request cache (or of another version of it)")
    start = _HEADER.size + count * _ENTRY.size
    if start > size:  # (a damaged count: not read, whatever it says)
        raise ValueError(f"{size} bytes, too few for the {count} entries its header gives")
    if len(head) < start:
        head += read(len(head), start - len(head))
    index = head[_HEADER.size : start]
    end = start
    if count:  # the replies follow each other: the last one ends the file
        _, offset, length = _ENTRY.unpack_from(index, len(index) - _ENTRY.size)
        end += offset + length
    if len(index) != count * _ENTRY.size or end != size:
        raise ValueError(f"{size} bytes, not the size its index gives (cut short, or not written by infermill)")
    return start, index


class _Index:
    """Where each entry of the segments a run found at its start is: arrays sorted by the key's
    first 8 bytes (~30 bytes an entry, not a dict's ~250), searched by bisection; the whole key
    is checked when its reply is read."""

    def __init__(self, segments: list[tuple[int, bytes]]):
        """``segments``: (segment number, its index) in the order whose first entry of a key wins."""
        prefixes, numbers, offsets, lengths = array("Q"), array("I"), array("Q"), array("I")
        for number, index in segments:
            for prefix, offset, length in _PREFIX_ENTRY.iter_unpack(index):
                prefixes.append(prefix)
                offsets.append(offset)
                lengths.append(length)
            numbers.extend([number] * (len(prefixes) - len(numbers)))
        order = sorted(range(len(prefixes)), key=prefixes.__getitem__)  # stable: the first segment first
        self.prefixes = array("Q", [prefixes[i] for i in order])
        self.numbers = array("I", [numbers[i] for i in order])
        self.offsets = array("Q", [offsets[i] for i in order])
        self.lengths = array("I", [lengths[i] for i in order])

    def __len__(self) -> int:
        return len(self.prefixes)

    def find(self, key: bytes) -> list[tuple[int, int, int]]:
        """Where the entries whose key starts as ``key`` are: (segment number, offset, length)."""
        prefixes = self.prefixes
        prefix = int.from_bytes(key[:8], "little")
        i = bisect.bisect_left(prefixes, prefix)
        found = []
        while i < len(prefixes) and prefixes[i] == prefix:
            found.append((self.numbers[i], self.offsets[i], self.lengths[i]))
            i += 1
        return found


class _LocalSegments:
    """The segments of a local folder."""

    def __init__(self, folder: Path):
        self.folder = folder

    def list(self) -> list[tuple[str, int]]:
        try:
            found = [(e.name, e.stat().st_size) for e in os.scandir(self.folder) if e.name.endswith(SUFFIX)]
        except FileNotFoundError:
            return []
        return sorted(found)

    def read(self, name: str, start: int, length: int) -> bytes:
        with open(self.folder / name, "rb") as file:
            return os.pread(file.fileno(), length, start)

    def write(self, name: str, data: bytes) -> None:
        temp = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.folder / name)
        finally:
            if temp.exists():
                temp.unlink()
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself on disk
        finally:
            os.close(directory)


class _RemoteSegments:
    """The segments under a prefix of an fsspec file system (an object store: a PUT is whole)."""

    def __init__(self, fs: Any, root: str):
        self.fs, self.root = fs, root.rstrip("/")

    def list(self) -> list[tuple[str, int]]:
        self.fs.invalidate_cache(self.root)  # (s3fs keeps listings: others' new segments would be missed)
        try:
            found = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = [(str(e["name"]).rsplit("/", 1)[-1], int(e.get("size") or 0)) for e in found]
        return sorted((name, size) for name, size in names if name.endswith(SUFFIX))

    def read(self, name: str, start: int, length: int) -> bytes:
        data: bytes = self.fs.cat_file(f"{self.root}/{name}", start=start, end=start + length)
        return data

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{name}", data)


class RequestCache:
    """A request cache's place: a local folder or an fsspec URL (``s3://bucket/prefix``) with
    its ``storage_options``. :meth:`open` loads it for one run (a :class:`CacheRun`)."""

    def __init__(self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.path = os.fspath(path)
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"RequestCache({self.path!r})"

    @property
    def remote(self) -> bool:
        return "://" in self.path and not self.path.startswith("file://")

    def _segments(self) -> _LocalSegments | _RemoteSegments:
        if not self.remote:
            return _LocalSegments(Path(self.path.removeprefix("file://")) / SEGMENTS)
        from infermill.io.filesystems import url_to_fs

        fs, root = url_to_fs(self.path, self.storage_options)
        return _RemoteSegments(fs, f"{root.rstrip('/')}/{SEGMENTS}")

    def check_writable(self) -> None:
        """``ConfigError`` naming ``cache.path`` if a segment cannot be written there: said before
        any server starts."""
        from infermill.io.filesystems import check_writable

        where = self.path if self.remote else str(Path(self.path.removeprefix("file://")) / SEGMENTS)
        try:
            if not self.remote:
                Path(where).mkdir(parents=True, exist_ok=True)
            check_writable(where, self.storage_options)
        except OSError as e:
            raise ConfigError(
                f"cache.path: {self.path}: cannot write there ({e.strerror or e}): choose a folder this user can "
                "write, or leave the cache section out"
            ) from None
        except StorageError as e:  # (it names the URL, why, and what to check)
            raise ConfigError(f"cache.path: {e}") from None

    def read_indexes(
        self, store: _LocalSegments | _RemoteSegments, listed: list[tuple[str, int]]
    ) -> list[tuple[int, bytes] | None]:
        """The index of each segment ``listed`` (name, size), read in threads; None for one that
        cannot be read or is not whole (logged)."""

        def read_index(name: str, size: int) -> tuple[int, bytes] | None:
            try:
                head = store.read(name, 0, min(size, _FIRST_READ))
                return decode_index(head, size, lambda start, length: store.read(name, start, length))
            except (OSError, ValueError) as e:
                logger.warning("request cache %s: segment %s left out: %s", self.path, name, e)
                return None

        with ThreadPoolExecutor(16 if self.remote else 4) as pool:
            return list(pool.map(lambda found: read_index(*found), listed))

    def open(self) -> CacheRun:
        """Read every segment's index (in threads): the run's view of the cache. A segment that
        cannot be read, or is not whole, is left out (and logged)."""
        started = time.monotonic()
        store = self._segments()
        try:
            listed = store.list()
        except OSError as e:
            raise InfermillError(f"cache.path {self.path}: cannot list its segments: {e}") from e

        indexes = self.read_indexes(store, listed)
        segments = [(name, found[0]) for (name, _), found in zip(listed, indexes, strict=True) if found is not None]
        index = _Index([(number, found[1]) for number, found in enumerate(i for i in indexes if i is not None)])
        run = CacheRun(self, store, segments, index)
        logger.info(
            "request cache %s: %d entries in %d segments, read in %.1f s",
            self.path,
            len(index),
            len(listed),
            time.monotonic() - started,
        )
        return run


class CacheRun:
    """One run's view of a request cache: the index of the segments it found at its start, and
    of those published since, by it or by other workers, as it found them at each publish (a
    dict: ~250 bytes an entry, until the run ends), the replies stored but not published yet,
    and the requests in flight (an identical one waits for the first's reply instead of being
    sent)."""

    def __init__(
        self,
        cache: RequestCache,
        store: _LocalSegments | _RemoteSegments,
        segments: list[tuple[str, int]] | None = None,
        index: _Index | None = None,
    ):
        self.cache = cache
        self._store = store
        self._segments = list(segments or [])  # name, where its replies start
        self._index = index or _Index([])
        # published since the run started: key -> segment number, offset, length
        self._published: dict[bytes, tuple[int, int, int]] = {}
        self._pending: dict[bytes, bytes] = {}
        self._in_flight: dict[bytes, asyncio.Event] = {}
        self._publishing: asyncio.Lock | None = None
        self.published = 0  # entries this run published

    def __len__(self) -> int:
        """The entries it knows (a key published twice counts twice)."""
        return len(self._index) + len(self._published) + len(self._pending)

    def _read(self, key: bytes, where: list[tuple[int, int, int]]) -> bytes | None:
        """The reply of ``key`` from the newest of the entries ``where`` that holds that whole key
        (a reply stored again, after one that could not be used, wins)."""
        for number, offset, length in sorted(where, reverse=True):
            name, start = self._segments[number]
            data = self._store.read(name, start + offset, length)
            if data[:KEY_BYTES] == key:
                return data[KEY_BYTES:]
        return None  # (another key with the same first 8 bytes)

    async def lookup(self, key: bytes) -> bytes | None:
        """The stored reply of ``key``; else None, and the caller sends the request and must then
        call :meth:`store` or :meth:`abandon`. While an identical request is in flight, waits for it."""
        while True:
            reply = self._pending.get(key)
            if reply is not None:
                return reply
            own = self._published.get(key)
            where = [own] if own is not None else self._index.find(key)
            if where:
                try:
                    reply = await asyncio.to_thread(self._read, key, where)
                except OSError as e:  # (deleted meanwhile: the request is sent again)
                    logger.warning("request cache %s: cannot read a stored reply: %s", self.cache.path, e)
                if reply is not None:
                    return reply
            waiting = self._in_flight.get(key)
            if waiting is None:
                self._in_flight[key] = asyncio.Event()
                return None
            await waiting.wait()  # then the reply is stored, or the request failed: sent again here

    def store(self, key: bytes, reply: bytes) -> None:
        """Keep ``reply`` (a successful reply's JSON) for ``key``: published by the next :meth:`publish`."""
        self._pending[key] = reply
        self.abandon(key)

    def abandon(self, key: bytes) -> None:
        """The request of ``key`` got no reply: an identical one waiting is sent."""
        waiting = self._in_flight.pop(key, None)
        if waiting is not None:
            waiting.set()

    async def publish(self) -> None:
        """Write the replies stored since the last publish as one segment (in a thread), then
        read the indexes of the segments other workers published since (:meth:`refresh`). A
        write that fails is logged, and its entries kept for the next publish."""
        if self._publishing is None:
            self._publishing = asyncio.Lock()
        async with self._publishing:
            await self._write_pending()
            await self.refresh()

    async def refresh(self) -> None:
        """Read the indexes of the segments published since this run last looked (one listing):
        a job's workers see each other's replies at their next unit, not only at their next run."""
        known = {name for name, _ in self._segments}
        try:
            listed = await asyncio.to_thread(self._store.list)
        except OSError as e:
            logger.warning("request cache %s: cannot list its segments: %s", self.cache.path, e)
            return
        new = [(name, size) for name, size in listed if name not in known]
        if not new:
            return
        indexes = await asyncio.to_thread(self.cache.read_indexes, self._store, new)
        for (name, _), found in zip(new, indexes, strict=True):
            if found is None:
                continue
            start, index = found
            number = len(self._segments)
            self._segments.append((name, start))
            for key, offset, length in _ENTRY.iter_unpack(index):
                self._published.setdefault(key, (number, offset, length))

    async def _write_pending(self) -> None:
        """Write the replies stored since the last publish as one segment (in a thread)."""
        if not self._pending:
            return
        entries = list(self._pending.items())
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:16]}{SUFFIX}"
        data = encode_segment(entries)
        try:
            await asyncio.to_thread(self._store.write, name, data)
        except Exception as e:  # a cache that cannot be written costs requests, not the job
            logger.warning("request cache %s: cannot write a segment (kept for a next try): %s", self.cache.path, e)
            return
        start, index = decode_index(data[:_FIRST_READ], len(data), lambda at, length: data[at : at + length])
        number = len(self._segments)
        self._segments.append((name, start))
        for key, offset, length in _ENTRY.iter_unpack(index):
            self._published[key] = (number, offset, length)
            del self._pending[key]
        self.published += len(entries)


@dataclass(frozen=True, slots=True)
class CacheSavings:
    """What a job's request cache saved, from its stats (the ``cache_*`` counters)."""

    hits: int
    misses: int
    saved_prompt_tokens: int
    saved_completion_tokens: int

    @classmethod
    def of(cls, stats: dict[str, Any]) -> CacheSavings | None:
        """From a run's or a job's stats; None for one without a request cache."""
        if "cache_hits" not in stats and "cache_misses" not in stats:
            return None
        return cls(
            int(stats.get("cache_hits") or 0),
            int(stats.get("cache_misses") or 0),
            int(stats.get("cache_saved_prompt_tokens") or 0),
            int(stats.get("cache_saved_completion_tokens") or 0),
        )

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """``30 hits, 10 misses (75% hit rate): 30 requests and 4,000 tokens saved (3,000 in, 1,000 out)``."""
        rate = f"{100 * self.hits / (self.hits + self.misses):.0f}%" if self.hits + self.misses else "no"
        tokens = self.saved_prompt_tokens + self.saved_completion_tokens
        return (
            f"{self.hits:,} hits, {self.misses:,} misses ({rate} hit rate): {self.hits:,} requests and {tokens:,} "
            f"tokens saved ({self.saved_prompt_tokens:,} in, {self.saved_completion_tokens:,} out)"
        )
