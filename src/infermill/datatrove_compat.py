"""The datatrove adapter: ``InferenceRunner`` as a datatrove pipeline step, and a datatrove
``DiskWriter`` as infermill's output writer.

Called as a step (:func:`run_step`), the runner runs the documents its upstream step yields as
this rank's document stream (:mod:`infermill.stream`) and, as datatrove's runner, passes nothing
downstream.

infermill's journal writes each checkpointed chunk with ``write_chunk(records, rank,
chunk_index)``. :class:`DatatroveWriter` does that through a datatrove writer
(``JsonlWriter``, ``ParquetWriter``, any ``DiskWriter``, with its own file name template,
compression, adapter, ``expand_metadata``, ``max_file_size``): each record becomes a datatrove
``Document`` again and goes through ``writer.write(document, rank=..., chunk_index=...)``.

A chunk's files are first written by a copy of the writer into a temporary folder under the
output folder (``_infermill_tmp/<rank>_<chunk>_<random>/``), closed, then each moved to its
final name: on a local or network file system a chunk's file appears only whole (a rename);
on an object store ``mv`` is a copy then a delete, so a file appears whole too, but a chunk
split into several files (``max_file_size``, metadata tags in the name) may appear one file
at a time. A run killed while writing leaves only temporary files, which the next run deletes.
A file name without ``${chunk_index}`` (datatrove's ``${rank}.jsonl``) makes a rank's whole
output one chunk: the runner allows it without ``checkpoints_local_dir``, as datatrove does.

A record's media bytes are base64 text in the journal (as infermill's writers write them);
:func:`to_datatrove_document` gives the datatrove writer bytes again.

:func:`step_stats` gives a rank's stats as a datatrove ``Stats``: what the runner holds as a
pipeline step's ``stats`` for datatrove's executors to save with the other steps' (each rank's
``stats/NNNNN.json``, merged in ``stats.json``).

This module imports datatrove only when a datatrove writer is used; importing infermill never
imports it.
"""

from __future__ import annotations

import base64
import copy
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any, Protocol

from infermill.io.writers import ChunkIndex, OutputWriter, Record, as_dict, chunk_text


class PipelineStep(Protocol):
    """What :func:`run_step` needs of the step (an ``InferenceRunner``: this module sits below
    the engine, which calls it)."""

    stats: Any

    def run(self, documents: Any, rank: int = 0, world_size: int = 1) -> dict[str, Any]: ...


TEMP_FOLDER = "_infermill_tmp"
#: records_per_chunk when a rank's output is one chunk (a datatrove writer's file name without ${chunk_index})
WHOLE_RANK = 1 << 62
#: the metadata key datatrove's runner sets (True) on a document with no results, which it does not write
NO_ROLLOUTS_MARK = "__no_rollouts_remove"
_TAG = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")


def adapt_writer(writer: Any, checkpoints_local_dir: str | None, records_per_chunk: int) -> tuple[OutputWriter, int]:
    """The runner's writer and records per chunk for ``writer``, a datatrove ``DiskWriter``
    (``TypeError`` for anything else): a file name without ``${chunk_index}`` makes the rank's
    whole output one chunk, as datatrove writes it without ``checkpoints_local_dir``."""
    if not is_datatrove_writer(writer):
        raise TypeError(
            "output_writer must be an infermill writer (infermill.io.writers) or a datatrove DiskWriter, "
            f"got {type(writer).__name__}"
        )
    adapted = DatatroveWriter(writer)
    if adapted.one_file_per_rank:
        if checkpoints_local_dir is not None:
            raise ValueError(
                f"the datatrove writer's output_filename {adapted.output_filename!r} must contain "
                "${chunk_index} when checkpoints_local_dir is set, as in datatrove: each chunk of a rank is "
                "its own file (e.g. output_filename='${rank}_${chunk_index}.jsonl')"
            )
        records_per_chunk = WHOLE_RANK  # one file per rank, still checkpointed: one unit, committed at the end
    return adapted, records_per_chunk


def run_step(runner: PipelineStep, data: Any, rank: int, world_size: int) -> None:
    """A datatrove pipeline step's call: run ``data`` (the upstream step's documents) as
    ``runner.run`` does; yield nothing downstream, as datatrove's runner. The rank's stats are then
    the runner's ``stats`` (a datatrove ``Stats``), which datatrove's executors save."""
    if data is None:
        raise ValueError(
            "InferenceRunner as a pipeline step needs documents from the step before it (e.g. a reader): it got none"
        )
    stats = runner.run(data, rank, world_size)
    try:
        runner.stats = step_stats(str(runner), stats)
    except ImportError:  # called as a step, but not by datatrove: no datatrove stats to keep
        pass


def is_datatrove_writer(writer: Any) -> bool:
    """Whether ``writer`` is a datatrove ``DiskWriter`` (checked by its classes' names: datatrove
    need not be imported to tell)."""
    return any(cls.__name__ == "DiskWriter" and cls.__module__.startswith("datatrove.") for cls in type(writer).__mro__)


class DatatroveWriter(OutputWriter):
    """infermill's writer interface over a datatrove ``DiskWriter`` (kept as ``writer``)."""

    def __init__(self, writer: Any):  # not OutputWriter.__init__: the datatrove writer has its own settings
        template = writer.output_filename.template
        #: no ``${chunk_index}`` in the file name: a rank writes one file, its whole output as one chunk
        self.one_file_per_rank = "${chunk_index}" not in template
        if "${rank}" not in template:
            raise ValueError(
                f"the datatrove writer's output_filename {template!r} must contain ${{rank}}: ranks write their own "
                "files (e.g. '${rank}_${chunk_index}.jsonl')"
            )
        self.writer = writer
        folder = writer.output_folder
        self.fs = folder.fs  # the underlying file system; ``folder`` works relative to its root
        self.root = folder.path.rstrip("/")
        self.storage_options = dict(getattr(self.fs, "storage_options", None) or {})  # (how its folder was opened)
        self.output_folder = self.fs.unstrip_protocol(self.root) if not self.is_local else self.root
        self.output_filename = template
        self.compression = None

    def filename(self, rank: int, chunk_index: ChunkIndex) -> str:
        """The chunk's file name pattern (relative to the output folder); tags known only per document
        (``${id}``, metadata) are ``*``."""
        name = self.writer.output_filename.safe_substitute(rank=f"{rank:05d}", chunk_index=str(chunk_index))
        return _TAG.sub("*", name)

    def chunk_file(self, rank: int, chunk_index: ChunkIndex) -> str | None:
        """None: a datatrove writer may split a chunk into several files, or name them per document."""
        return None

    def write_chunk(self, records: Iterable[Record], rank: int, chunk_index: ChunkIndex) -> int:
        from datatrove.io import get_datafolder

        folder = self.writer.output_folder
        temp_dir = f"{TEMP_FOLDER}/{rank:05d}_{chunk_text(chunk_index)}_{uuid.uuid4().hex[:8]}"
        temp_folder = get_datafolder(
            folder.unstrip_protocol(temp_dir) if not self.is_local else f"{self.root}/{temp_dir}"
        )
        writer = _fresh_copy(self.writer)  # the same settings, its own files
        writer.output_folder = temp_folder
        writer.output_mg = temp_folder.get_output_file_manager(
            mode=self.writer.output_mg.mode, compression=self.writer.output_mg.compression
        )
        count = 0
        try:
            with writer:
                for record in records:
                    writer.write(to_datatrove_document(as_dict(record)), rank=rank, chunk_index=chunk_index)
                    count += 1
            if count:
                for path in temp_folder.find("", withdirs=False):
                    folder.makedirs(_parent(path), exist_ok=True)
                    folder.mv(f"{temp_dir}/{path}", path)
        finally:
            if folder.exists(temp_dir):
                folder.rm(temp_dir, recursive=True)
        return count

    def remove_chunk_file(self, rank: int, chunk_index: ChunkIndex) -> None:
        folder = self.writer.output_folder
        name = self.filename(rank, chunk_index)
        patterns = {name, _with_file_id(name)}  # max_file_size names files NNN_<name>
        for pattern in patterns:
            for path in folder.glob(pattern):
                folder.rm(path)

    def remove_temp_files(self, rank: int, chunk_index: ChunkIndex | None = None) -> None:
        folder = self.writer.output_folder
        chunk = "*" if chunk_index is None else chunk_text(chunk_index)
        for path in folder.glob(f"{TEMP_FOLDER}/{rank:05d}_{chunk}_????????"):
            folder.rm(path, recursive=True)


def step_stats(name: str, stats: dict[str, Any]) -> Any:
    """A rank's ``stats`` (as :meth:`InferenceRunner.run` returns them) as a datatrove ``Stats``
    named ``name``: each count that is not 0 as a per-task total (datatrove's merge sums them and
    shows the mean per task); the inference time as the step's runtime (per task) and as datatrove's
    runner keeps it (``inference_time``, seconds)."""
    from datatrove.utils.stats import Stats, TimingStats

    result = Stats(name)
    for key, value in stats.items():
        if type(value) is int and value:  # counts; not rates, times or per-replica lists
            result[key].update(value, unit="task")
    seconds = float(stats.get("inference_time_sec", 0.0))
    result.time_stats = TimingStats(unit="task")
    result.time_stats.update(seconds)
    result.stats["inference_time"] = TimingStats(unit="seconds")
    result.stats["inference_time"].update(seconds)
    return result


def to_datatrove_document(record: dict[str, Any]) -> Any:
    """A record (as the journal keeps it) as a datatrove ``Document``."""
    from datatrove.data import Document

    media = [_media(m) if isinstance(m, dict) else m for m in record.get("media") or []]
    return Document(text=record.get("text", ""), id=record["id"], media=media, metadata=record.get("metadata") or {})


def _fresh_copy(writer: Any) -> Any:
    """A copy of ``writer`` with the same settings and state of its own: each container it holds
    (``ParquetWriter``'s open writers and batches, file counters, a settings dict) is copied. The
    original never writes, so the containers that hold per-file state start empty."""
    fresh = copy.copy(writer)
    for name, value in vars(writer).items():
        if type(value) in (dict, list, set, Counter, defaultdict):
            setattr(fresh, name, copy.copy(value))  # keeps a defaultdict's factory
    return fresh


def _media(item: dict[str, Any]) -> Any:
    """A media item (as the journal keeps it: its bytes as base64 text) as a datatrove ``Media``."""
    from datatrove.data import Media

    if isinstance(item.get("media_bytes"), str):
        item = {**item, "media_bytes": base64.b64decode(item["media_bytes"])}
    return Media(**item)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _with_file_id(name: str) -> str:
    head, _, base = name.rpartition("/")
    return f"{head}/[0-9][0-9][0-9]_{base}" if head else f"[0-9][0-9][0-9]_{base}"
