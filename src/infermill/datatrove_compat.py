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

Nothing of infermill's is written in the writer's output folder, which the next step reads whole:
the job's folder is ``checkpoints_local_dir`` when given, else ``OUTPUT.infermill`` beside a local
output (:meth:`~infermill.layout.JobLayout.outside_output`). A chunk's files are first written by a
copy of the writer into a temporary folder in the job's, ``staging/<rank>_<chunk>_<random>/``,
closed, then each moved to its final name: a rename on a local or network file system, so that a
chunk's file appears only whole. Where the job's folder is on another file system than the output
(``checkpoints_local_dir`` elsewhere, or an output that is a mount point), each file is first copied
into a hidden ``.NAME.<random>.tmp`` beside its final name, then renamed. To an object store, each
file is uploaded whole (a file appears whole, a chunk split into several files by ``max_file_size``
or metadata tags in the name file by file). A run killed while writing leaves only temporary files,
which the rank's next run deletes. A file name without ``${chunk_index}`` (datatrove's
``${rank}.jsonl``) makes a rank's whole output one chunk: the runner allows it without
``checkpoints_local_dir``, as datatrove does.

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
import contextlib
import copy
import errno
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from infermill.errors import ConfigError
from infermill.io.writers import ChunkIndex, OutputWriter, Record, as_dict, chunk_text
from infermill.layout import INFERMILL_DIR, JobLayout


class PipelineStep(Protocol):
    """What :func:`run_step` needs of the step (an ``InferenceRunner``: this module sits below
    the engine, which calls it)."""

    stats: Any
    config: Any

    def run(
        self, documents: Any, rank: int = 0, world_size: int = 1, *, live: bool | None = None
    ) -> dict[str, Any]: ...


#: the job folder's folder of chunk files being written
STAGING_DIR = "staging"
#: an earlier infermill's folder of temporary files in a datatrove writer's output
EARLIER_TMP_DIR = "_infermill_tmp"
#: the suffix of a chunk's file being copied into the output from another file system (``.NAME.<random>.tmp``)
COPY_SUFFIX = ".tmp"
#: records_per_chunk when a rank's output is one chunk (a datatrove writer's file name without ${chunk_index})
WHOLE_RANK = 1 << 62
#: the metadata key datatrove's runner sets (True) on a document with no results, which it does not write
NO_ROLLOUTS_MARK = "__no_rollouts_remove"
logger = logging.getLogger(__name__)
_TAG = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")


def adapt_writer(
    writer: Any, checkpoints_local_dir: str | None, records_per_chunk: int
) -> tuple[OutputWriter, int, JobLayout]:
    """The runner's writer, records per chunk and job layout for ``writer``, a datatrove
    ``DiskWriter`` (``TypeError`` for anything else): a file name without ``${chunk_index}`` makes
    the rank's whole output one chunk, as datatrove writes it without ``checkpoints_local_dir``; the
    job's files are outside the output folder (:meth:`JobLayout.outside_output`)."""
    if not is_datatrove_writer(writer):
        raise TypeError(
            "output_writer must be an infermill writer (infermill.io.writers) or a datatrove DiskWriter, "
            f"got {type(writer).__name__}"
        )
    adapted = DatatroveWriter(writer, checkpoints_local_dir)
    _refuse_earlier_files(adapted)
    if adapted.is_local and checkpoints_local_dir is None and os.path.ismount(adapted.root):
        logger.warning(
            "the output %s is a mount point: the job's folder %s is on another file system (the parent's), where "
            "its checkpoints are lost if that one is (a container's own); each chunk's file is copied into the "
            "output. Set checkpoints_local_dir to a folder on lasting storage to keep them",
            adapted.root,
            adapted.layout.root,
        )
    if adapted.one_file_per_rank:
        if checkpoints_local_dir is not None:
            raise ValueError(
                f"the datatrove writer's output_filename {adapted.output_filename!r} must contain "
                "${chunk_index} when checkpoints_local_dir is set, as in datatrove: each chunk of a rank is "
                "its own file (e.g. output_filename='${rank}_${chunk_index}.jsonl')"
            )
        records_per_chunk = WHOLE_RANK  # one file per rank, still checkpointed: one unit, committed at the end
    return adapted, records_per_chunk, adapted.layout


def _refuse_earlier_files(adapted: DatatroveWriter) -> None:
    """Refuse (``ConfigError``) an output holding an earlier infermill's files (``_infermill/``,
    ``_infermill_tmp/``), which the next step's reader would read, saying how to move or delete them."""
    earlier, earlier_tmp = (os.path.join(adapted.output_folder, name) for name in (INFERMILL_DIR, EARLIER_TMP_DIR))
    if adapted.is_local and os.path.isdir(earlier):
        root = shlex.quote(str(adapted.layout.root))
        raise ConfigError(
            f"{earlier} holds infermill's files as an earlier infermill kept them, in the output folder (which the "
            f"next step's reader reads whole); this one keeps them in {adapted.layout.root}. To resume that job, "
            f"move them there (mkdir -p {root} && cp -a {shlex.quote(earlier)}/. {root}/ && rm -r "
            f"{shlex.quote(earlier)}) and delete {earlier_tmp} if there; to start over, delete both"
        )
    if adapted.writer.output_folder.isdir(EARLIER_TMP_DIR):
        how = f" (rm -r {shlex.quote(earlier_tmp)})" if adapted.is_local else ""
        raise ConfigError(
            f"{earlier_tmp} is an earlier infermill's folder of temporary files, in the output folder (which the "
            f"next step's reader reads whole); nothing in it is a result: delete it{how} and run again"
        )


def run_step(runner: PipelineStep, data: Any, rank: int, world_size: int) -> None:
    """A datatrove pipeline step's call: run ``data`` (the upstream step's documents) as
    ``runner.run`` does, its progress as log lines; yield nothing downstream, as datatrove's runner.
    While it runs, infermill's log records go to datatrove's logger (:func:`datatrove_logging`). The
    rank's stats are then the runner's ``stats`` (a datatrove ``Stats``), which datatrove's executors
    save."""
    if data is None:
        raise ValueError(
            "InferenceRunner as a pipeline step needs documents from the step before it (e.g. a reader): it got none"
        )
    started = time.perf_counter()
    with datatrove_logging():
        stats = runner.run(data, rank, world_size, live=False)
    try:
        runner.stats = step_stats(
            str(runner), stats, time.perf_counter() - started, runner.config.rollouts_per_document
        )
    except ImportError:  # called as a step, but not by datatrove: no datatrove stats to keep
        pass


@contextlib.contextmanager
def datatrove_logging() -> Iterator[None]:
    """While in it, the records of infermill's loggers go to datatrove's logger (loguru) at their
    level, and so to its task log and its stderr in its format, and not on to the root logger
    (which would print WARNINGs a second time, unformatted); INFO and above, unless the
    ``infermill`` logger has a level of its own. Nothing is changed where loguru is not installed
    (the step not run by datatrove). Only the ``infermill`` logger is touched, and put back as it
    was once the last of overlapping uses (steps in threads of one process) ends."""
    try:
        from loguru import logger as loguru_logger
    except ImportError:
        yield
        return
    with _BRIDGE.lock:
        if _BRIDGE.users == 0:
            _BRIDGE.install(loguru_logger)
        _BRIDGE.users += 1
    try:
        yield
    finally:
        with _BRIDGE.lock:
            _BRIDGE.users -= 1
            if _BRIDGE.users == 0:
                _BRIDGE.uninstall()


class _Bridge:
    """The ``infermill`` logger's one handler to loguru, shared by overlapping ``datatrove_logging``
    uses, and the logger's settings to put back when the last one ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.handler: _LoguruHandler | None = None
        self.saved = (logging.NOTSET, True)  # the infermill logger's level and propagate

    def install(self, loguru_logger: Any) -> None:
        infermill_logger = logging.getLogger("infermill")
        self.saved = (infermill_logger.level, infermill_logger.propagate)
        self.handler = _LoguruHandler(loguru_logger)
        infermill_logger.addHandler(self.handler)
        infermill_logger.propagate = False
        if infermill_logger.level == logging.NOTSET:
            infermill_logger.setLevel(logging.INFO)

    def uninstall(self) -> None:
        infermill_logger = logging.getLogger("infermill")
        if self.handler is not None:
            infermill_logger.removeHandler(self.handler)
            self.handler = None
        infermill_logger.setLevel(self.saved[0])
        infermill_logger.propagate = self.saved[1]


_BRIDGE = _Bridge()


class _LoguruHandler(logging.Handler):
    """A ``logging`` handler that logs each record with loguru, as the code that made it (its
    logger's name, function and line, which datatrove's format shows). A record's traceback goes
    as text, as ``logging`` formats it: loguru's own (with ``diagnose``, datatrove's setting) would
    show the frames' local variables (server commands, keys) in the task logs."""

    def __init__(self, loguru_logger: Any):
        super().__init__()
        self.loguru_logger = loguru_logger
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = self.loguru_logger.level(record.levelname).name
        except ValueError:  # a level loguru does not name: its number
            level = record.levelno

        def as_logged(entry: dict[str, Any]) -> None:
            entry.update(name=record.name, function=record.funcName, line=record.lineno, module=record.module)

        try:
            message = self.format(record)  # the message, then the traceback and stack, if any
        except Exception:  # (logging's own way with a record it cannot format)
            self.handleError(record)
            return
        self.loguru_logger.patch(as_logged).log(level, message)


def is_datatrove_writer(writer: Any) -> bool:
    """Whether ``writer`` is a datatrove ``DiskWriter`` (checked by its classes' names: datatrove
    need not be imported to tell)."""
    return any(cls.__name__ == "DiskWriter" and cls.__module__.startswith("datatrove.") for cls in type(writer).__mro__)


class DatatroveWriter(OutputWriter):
    """infermill's writer interface over a datatrove ``DiskWriter`` (kept as ``writer``); the job's
    files in ``checkpoints_local_dir``, or beside the output (``layout``)."""

    # not OutputWriter.__init__: the datatrove writer has its own settings
    def __init__(self, writer: Any, checkpoints_local_dir: str | None = None):
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
        self.root = folder.path.rstrip("/") or "/"  # (``/`` itself stays the root, not the current folder)
        self.storage_options = dict(getattr(self.fs, "storage_options", None) or {})  # (how its folder was opened)
        self.output_folder = self.fs.unstrip_protocol(self.root) if not self.is_local else self.root
        self.output_filename = template
        self.compression = None
        self.layout = JobLayout.outside_output(self.output_folder, checkpoints_local_dir)
        self.staging = self.layout.root / STAGING_DIR  # chunk files being written

    def filename(self, rank: int, chunk_index: ChunkIndex) -> str:
        """The chunk's file name pattern (relative to the output folder); tags known only per document
        (``${id}``, metadata) are ``*``."""
        return self._name_pattern(rank, str(chunk_index))

    def _name_pattern(self, rank: int, chunk: str) -> str:
        name = self.writer.output_filename.safe_substitute(rank=f"{rank:05d}", chunk_index=chunk)
        return _TAG.sub("*", name)

    def chunk_file(self, rank: int, chunk_index: ChunkIndex) -> str | None:
        """None: a datatrove writer may split a chunk into several files, or name them per document."""
        return None

    def write_chunk(self, records: Iterable[Record], rank: int, chunk_index: ChunkIndex) -> int:
        from datatrove.io import get_datafolder

        staging = self.staging / f"{rank:05d}_{chunk_text(chunk_index)}_{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        writer = _fresh_copy(self.writer)  # the same settings, its own files
        writer.output_folder = get_datafolder(str(staging))
        writer.output_mg = writer.output_folder.get_output_file_manager(
            mode=self.writer.output_mg.mode, compression=self.writer.output_mg.compression
        )
        count = 0
        try:
            with writer:
                for record in records:
                    writer.write(to_datatrove_document(as_dict(record)), rank=rank, chunk_index=chunk_index)
                    count += 1
            if count:
                for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                    self._place(path, path.relative_to(staging).as_posix())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return count

    def _place(self, staged: Path, name: str) -> None:
        """Make ``staged`` the output's file ``name``, appearing whole: renamed, or uploaded."""
        folder = self.writer.output_folder
        folder.makedirs(_parent(name), exist_ok=True)
        if not self.is_local:
            folder.put_file(str(staged), name)
            return
        final = os.path.join(self.root, name)
        try:
            os.replace(staged, final)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _copy_into_place(staged, final)

    def remove_chunk_file(self, rank: int, chunk_index: ChunkIndex) -> None:
        folder = self.writer.output_folder
        name = self.filename(rank, chunk_index)
        patterns = {name, _with_file_id(name)}  # max_file_size names files NNN_<name>
        for pattern in patterns:
            for path in folder.glob(pattern):
                folder.rm(path)

    def remove_temp_files(self, rank: int, chunk_index: ChunkIndex | None = None) -> None:
        chunk = "*" if chunk_index is None else chunk_text(chunk_index)
        for path in self.staging.glob(f"{rank:05d}_{chunk}_????????"):
            shutil.rmtree(path, ignore_errors=True)
        if self.is_local:  # a copy onto the output's file system, left by a run killed while it was made
            name = self._name_pattern(rank, "*" if chunk_index is None else str(chunk_index))
            for pattern in {name, _with_file_id(name)}:
                head, _, base = pattern.rpartition("/")
                for path in Path(self.root).glob(f"{head}/.{base}.*{COPY_SUFFIX}".lstrip("/")):
                    path.unlink(missing_ok=True)


#: infermill's counts that datatrove's runner keeps under a name of its own (``stats.json``'s name:
#: datatrove's); the others go into the step's stats under infermill's name
DATATROVE_NAMES = {
    "requests_ok": "successful_requests",
    "requests_failed": "failed_requests",
    "documents_failed": "failed_documents",
    "documents_skipped": "skipped_bad_requests",
    "rollouts_ok": "successful_rollouts",
    "prompt_tokens": "prompt_tokens",
    "completion_tokens": "completion_tokens",
}
#: infermill's counts left out of the step's stats: datatrove's ``documents_processed`` (written or
#: empty) is not infermill's (which counts skipped and failed documents too), whose parts are there
LEFT_OUT = ("documents_processed",)


def step_stats(name: str, stats: dict[str, Any], seconds: float = 0.0, rollouts_per_document: int = 1) -> Any:
    """A rank's ``stats`` (as :meth:`InferenceRunner.run` returns them) as a datatrove ``Stats``
    named ``name``, as datatrove's runner keeps its own: its counters under its names and units
    (:data:`DATATROVE_NAMES`; ``documents_processed``, ``failed_rollouts`` and ``requests`` made of
    infermill's), ``inference_time`` (seconds), and ``seconds`` (the step's time) as the step's
    runtime; infermill's other counts that are not 0 beside them, each a per-task total. A token
    count's mean is per successful request, as datatrove's; its min, max and deviation are not kept
    (each task's are its mean: datatrove's merge of the tasks' then shows those of their means)."""
    from datatrove.utils.stats import MetricStats, Stats, TimingStats

    def count(key: str) -> int:
        return int(stats.get(key) or 0)

    result = Stats(name)
    requests_ok, written_or_empty = count("requests_ok"), count("documents_written") + count("documents_empty")
    handled = written_or_empty + count("documents_skipped")  # documents whose rollouts datatrove counts
    for key, (total, n, unit) in {  # datatrove's: the total, how many updates made it, their unit
        "documents_processed": (written_or_empty, written_or_empty, "document"),
        "failed_documents": (count("documents_failed"), count("documents_failed"), "document"),
        "skipped_bad_requests": (count("documents_skipped"), count("documents_skipped"), "document"),
        "successful_rollouts": (count("rollouts_ok"), written_or_empty, "document"),
        "failed_rollouts": (
            count("rollouts_none") + count("documents_skipped") * rollouts_per_document,
            handled,
            "document",
        ),
        "requests": (
            requests_ok + count("requests_failed") + count("requests_cached"),
            count("rollouts_ok") + count("rollouts_none"),
            "rollout",
        ),
        "successful_requests": (requests_ok, requests_ok, "request"),
        "failed_requests": (count("requests_failed"), count("requests_failed"), "request"),
        "prompt_tokens": (count("prompt_tokens"), requests_ok, "request"),
        "completion_tokens": (count("completion_tokens"), requests_ok, "request"),
    }.items():
        if n:  # (as datatrove: a counter nothing updated is not there)
            result[key] = MetricStats(total=total, n=n, mean=total / n, min=total / n, max=total / n, unit=unit)
    for key, value in stats.items():
        if type(value) is int and value and key not in DATATROVE_NAMES and key not in LEFT_OUT:
            result[key].update(value, unit="task")  # counts; not rates, times or per-replica lists
    result.time_stats = TimingStats(unit="total")
    result.time_stats.update(seconds)
    inference = float(stats.get("inference_time_sec", 0.0))
    result.stats["inference_time"] = TimingStats(unit="seconds")
    result.stats["inference_time"].update(inference)
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


def _copy_into_place(staged: Path, final: str) -> None:
    """Copy ``staged`` (on another file system than the output) to ``final``, appearing whole: into
    a hidden ``.NAME.<random>.tmp`` in ``final``'s own folder (the same file system, whatever is
    mounted where; a name no other rank or chunk has), then renamed."""
    fd, copy_path = tempfile.mkstemp(
        dir=os.path.dirname(final), prefix=f".{os.path.basename(final)}.", suffix=COPY_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as copy_file, open(staged, "rb") as source:
            shutil.copyfileobj(source, copy_file)
        os.replace(copy_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(copy_path)
        raise


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _with_file_id(name: str) -> str:
    head, _, base = name.rpartition("/")
    return f"{head}/[0-9][0-9][0-9]_{base}" if head else f"[0-9][0-9][0-9]_{base}"
