"""A job whose state lives in an object store (``JobLayout.store``, an ``s3://`` output).

Its work queue is in the store (:class:`~infermill.queue_storage_s3.S3QueueStorage`); each
worker keeps its own records (``stats/WORKER.json``, ``failures/WORKER.jsonl``,
``metrics/WORKER.jsonl``) in a local mirror of the job's folder, as on a file system, and
uploads them whole (:func:`push`) whenever it keeps its stats: before each unit it commits,
and when it ends. A reader (``status``, ``report``, the sum of the job's stats) downloads every
worker's records into a folder of its own (:func:`reading`), never into a worker's mirror, and
reads them there as it reads a local job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infermill.errors import ConfigError
from infermill.io.filesystems import replace_whole
from infermill.layout import JobLayout
from infermill.queue_storage import DEFAULT_STORAGE_TIMEOUT_SEC, QueueStorage

if TYPE_CHECKING:
    from infermill.queue_storage_s3 import S3QueueStorage

#: below this lease timeout, a store's whole-second clock weighs (a warning says so)
SHORTEST_STORE_LEASE_SEC = 10.0
#: the folders of each worker's own records, under the job's folder (``JobLayout`` names them)
RECORDS = ("stats", "failures", "metrics")

_stores: dict[str, Any] = {}  # one client per store (they pool connections), for the process
_stores_lock = threading.Lock()


def job_storage(layout: JobLayout, timeout_sec: float = DEFAULT_STORAGE_TIMEOUT_SEC) -> S3QueueStorage:
    """The storage of the job's folder in its store (``layout.store`` must be set)."""
    if layout.store is None:
        raise ValueError("the job's files are local: it has no store")
    from infermill.queue_storage_s3 import S3QueueStorage, open_store

    key = json.dumps([layout.store, layout.output_options], sort_keys=True, default=str)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            try:
                import obstore
            except ImportError:
                raise ConfigError(
                    f"the output {layout.where()} is on S3, whose client is an optional part of infermill: "
                    "pip install 'infermill[s3]'"
                ) from None
            try:
                store = _stores[key] = open_store(layout.store, layout.output_options)
            except obstore.exceptions.BaseError as e:  # (its message: pages of a Rust Debug dump)
                raise ConfigError(
                    f"cannot use the store {layout.store}: {str(e).splitlines()[0][:300]}; check the output path, "
                    "its storage_options and the AWS_* variables"
                ) from None
    return S3QueueStorage(store, timeout_sec, url=layout.store)


def check_store(layout: JobLayout) -> None:
    """Refuse (``ConfigError``, one line) a store that cannot hold the job's queue: unreachable,
    or without conditional writes. Before a server is launched."""
    storage = job_storage(layout)
    assert layout.store_root is not None
    try:
        storage.check_conditional_writes(layout.store_root, layout.where())
    except OSError as e:
        raise ConfigError(f"cannot write the job's state to {layout.where()}: {e}") from None
    layout.root.mkdir(parents=True, exist_ok=True)  # the local mirror


def has_plan(layout: JobLayout) -> bool:
    """Whether the job's queue has a plan (the job was planned)."""
    if layout.store is None:
        return layout.plan_file.exists()
    return job_storage(layout).exists(layout.plan_file)


def remote(layout: JobLayout, path: Path) -> Path:
    """The key of the mirror's file ``path`` in the store."""
    assert layout.store_root is not None
    return layout.store_root / path.relative_to(layout.root)


def push(layout: JobLayout, *paths: Path, storage: QueueStorage | None = None) -> None:
    """Upload the mirror's files ``paths`` (this worker's own records) to the store, each whole
    (an absent one is left out). Nothing for a job on a file system."""
    if layout.store is None:
        return
    storage = storage or job_storage(layout)
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        storage.replace(remote(layout, path), data)


@contextlib.contextmanager
def reading(layout: JobLayout, records: tuple[str, ...] = RECORDS) -> Iterator[JobLayout]:
    """A reader's layout of the job: itself on a file system; for a job in a store, one whose
    folder is a temporary folder (removed after) holding every worker's ``records`` (of
    :data:`RECORDS`), downloaded."""
    if layout.store is None or layout.store_root is None:
        yield layout
        return
    storage = job_storage(layout)
    with tempfile.TemporaryDirectory(prefix="infermill-reading-") as temp:
        folder = Path(temp) / layout.root.name
        for name in records:
            (folder / name).mkdir(parents=True)
            for file in storage.list(layout.store_root / name):
                _download(storage, layout.store_root / name / file, folder / name / file)
        for file in storage.list(layout.store_root):
            if file.startswith("stats") and file.endswith(".json"):
                _download(storage, layout.store_root / file, folder / file)
        yield dataclasses.replace(layout, root=folder, checkpoints=folder)


def _download(storage: QueueStorage, key: Path, path: Path) -> None:
    try:
        replace_whole(path, storage.read(key))
    except FileNotFoundError:  # deleted meanwhile (the job started over)
        pass
