"""Prefix-aware ordering of a run's documents (``inference.prefix_window``).

An inference server with a prefix cache (vLLM's automatic prefix caching, SGLang's radix
cache) computes a prompt's shared start once only if it is still cached when the next
request that shares it arrives. :class:`PrefixOrder` reads up to ``window`` documents ahead
of the engine's workers, sorts them by their key (the rendered prompt, or a field of the
record), and hands them out in that order, so that documents sharing a prefix are sent
together, whatever their order in the input. It never sorts more than a window: memory stays
bounded by it, and each document is still journalled by its own index (exactly-once and
resuming are unchanged; the output is in completion order, as without it).

Neighbours (in key order) whose keys share at least half of the shorter key form a group,
whose documents share one :class:`~infermill.servers.Affinity`: with replicas, they go to
one replica (under the pool's load guard).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from infermill.errors import ConfigError
from infermill.servers import Affinity
from infermill.types import END_OF_INPUT, Document

#: a document's ordering key: a record field's name, or a function of the document
PrefixKey = str | Callable[[Document], str]

#: what ``key`` is given: a document's ``(index, item)`` as its source hands it out
Key = Callable[[int, Any], str]

#: how long a fill waits for the source (a claim) while it has documents in hand, in seconds
PULL_WAIT_SEC = 0.1

#: neighbours whose keys share at least this share of the shorter one are one group
GROUP_SHARED_SHARE = 0.5


class PrefixOrder:
    """``next_document`` for the engine's workers: ``source``'s documents, ``window`` at a time,
    in the order of ``key`` (see the module's docstring). ``key(index, item)``: the document's
    ordering key ("" when it has none, e.g. a bad record: those go first)."""

    def __init__(self, source: Callable[[], Awaitable[Any]], key: Key, window: int, grouped: bool = False):
        """``grouped``: give each group of neighbours an :class:`Affinity` (:meth:`affinity`)."""
        self._source = source
        self._key = key
        self.window = window
        self._grouped = grouped
        self._ready: deque[tuple[int, Any]] = deque()
        self._affinities: dict[int, Affinity] = {}  # the current window's, by document index
        self._lock = asyncio.Lock()
        self._pull: asyncio.Future[Any] | None = None  # the source's next document, being read
        self._ended = False

    async def __call__(self) -> Any:
        """The next document, as ``(index, item)``, or ``END_OF_INPUT``."""
        if self._ready:
            return self._ready.popleft()
        async with self._lock:
            if not self._ready and not self._ended:
                await self._fill()
            return self._ready.popleft() if self._ready else END_OF_INPUT

    def affinity(self, index: int) -> Affinity:
        """The replica affinity of document ``index`` (handed out from the current window), shared
        by its group."""
        found = self._affinities.get(index)
        return found if found is not None else Affinity()

    def close(self) -> None:
        """Stop reading ahead (a read in progress is cancelled)."""
        if self._pull is not None and not self._pull.done():
            self._pull.cancel()
        self._pull = None

    async def _fill(self) -> None:
        """Read up to a window of documents and queue them in key order. Stops early at the end,
        or when the source would have to wait (e.g. to claim a unit) while some are in hand: those
        must not wait for others' units, whose end may depend on theirs."""
        taken: list[tuple[str, int, Any]] = []
        while len(taken) < self.window:
            if self._pull is None:
                self._pull = asyncio.ensure_future(self._source())
            if not self._pull.done() and taken:
                await asyncio.sleep(0)  # a document in hand is read at once
                if not self._pull.done():  # a claim, or the next unit's start: waited for a moment only
                    await asyncio.wait((self._pull,), timeout=PULL_WAIT_SEC)
                    if not self._pull.done():
                        break
            item = await self._pull
            self._pull = None
            if item is END_OF_INPUT:
                self._ended = True
                break
            index, raw = item
            taken.append((self._key_of(index, raw), index, raw))
        taken.sort(key=_first)
        self._ready.extend((index, raw) for _, index, raw in taken)
        if self._grouped:
            self._affinities = group_affinities([(key, index) for key, index, _ in taken])

    def _key_of(self, index: int, raw: Any) -> str:
        try:
            key = self._key(index, raw)
        except Exception:  # a document whose prompt fails fails in its rollout, where that is recorded
            return ""
        return key if isinstance(key, str) else "" if key is None else str(key)  # (a key function's own)


def document_key(prefix_key: PrefixKey | None, rollout: Any, window: int | None) -> Callable[[Document], str] | None:
    """What orders a job's documents with ``prefix_window``: ``prefix_key`` (a field of the record,
    or a function of the document), else the rollout's own ``prefix`` (a built-in's prompt);
    None without a window. ``ConfigError`` before anything starts when there is no key."""
    if window is None:
        return None
    if isinstance(prefix_key, str):
        return field_key(prefix_key)
    if prefix_key is not None:
        return prefix_key
    own = getattr(rollout, "prefix", None)
    if own is None:
        raise ConfigError(
            "inference.prefix_window orders documents by their prompt, which a function rollout does not tell: set "
            "rollout.prefix_key to the field of the record that starts its prompt (or pass prefix_key= to "
            "InferenceRunner), or leave prefix_window out"
        )
    return own  # type: ignore[no-any-return]


def field_key(name: str) -> Callable[[Document], str]:
    """The key of a document: its field ``name`` (``text``, or a field of its metadata) as text."""

    def key(document: Document) -> str:
        value = document.text if name == "text" else (document.metadata or {}).get(name)
        return "" if value is None else value if isinstance(value, str) else str(value)

    return key


def group_affinities(keyed: list[tuple[str, int]]) -> dict[int, Affinity]:
    """One ``Affinity`` per group of neighbours among ``keyed`` ((key, index) in key order):
    a document joins its predecessor's group when their keys share at least
    ``GROUP_SHARED_SHARE`` of the shorter one (and are not empty)."""
    groups: list[list[int]] = []
    previous: str | None = None
    for key, index in keyed:
        if previous is None or not shares_prefix(previous, key):
            groups.append([])
        groups[-1].append(index)
        previous = key
    affinities: dict[int, Affinity] = {}
    for group in groups:  # a document alone keeps its own affinity: its calls stay on one replica
        affinity = Affinity(group=len(group) > 1)
        affinities.update(dict.fromkeys(group, affinity))
    return affinities


def shares_prefix(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` share a start of at least ``GROUP_SHARED_SHARE`` of the shorter one."""
    need = math.ceil(GROUP_SHARED_SHARE * min(len(a), len(b)))
    return need > 0 and a[:need] == b[:need]


def _first(entry: tuple[str, int, Any]) -> tuple[str, int]:
    return entry[0], entry[1]
