"""Where a job keeps its own files: every path under ``OUTPUT/_infermill/``, in one place.

    OUTPUT/_infermill/
      queue/                      the work queue: plan, leases, done marks, journals (infermill.queue)
      ranks/RRRRR/                the queue of rank RRRRR of a document stream with several ranks
                                  (infermill.stream; a stream with one rank uses queue/)
      stats.json                  (stats_rank_RRRRR.json per rank of a stream with several ranks)
      stats/WORKER.json           each worker run's stats so far, summed into stats.json
      failures/WORKER.jsonl       documents a worker skipped or failed, with the reason
      logs/                       the server's output (the job file's default server_log_folder)
      metrics/WORKER.jsonl        each worker's metrics over time (infermill.timeseries)
      slurm/                      the scripts of a job's Slurm submissions
      report.html                 ``infermill report``'s page, unless told another place
      card.json                   the dataset card's settings (infermill.card): its metadata, the job's command
      trial/                      the output of ``infermill run --limit N`` (a job of its own: trial/_infermill/)

An older infermill kept static ranks' checkpoints in ``checkpoints/rank_RRRRR/``: they are
refused (:meth:`JobLayout.legacy_ranks`), never read.

Checkpoints may live elsewhere (``checkpoint.dir``): they must be local, so a remote
output needs one, and then the job's other files go into that folder too.

A datatrove writer's output folder holds nothing but the output (the next pipeline step reads it
whole): the job's folder (what is under ``OUTPUT/_infermill/`` above) is ``checkpoints_local_dir``
when given, else ``OUTPUT.infermill/`` beside a local output (:meth:`JobLayout.outside_output`).

An output on S3 (``s3://bucket/prefix``) needs none: the job's state lives in the store, under
``prefix/_infermill/`` (``store`` and ``store_root``). Its queue is there (the queue's paths
are the store's keys); each worker keeps its own records (stats, failures, time series) in a
local mirror of that folder (``root``, a temporary folder), which it uploads, and which a
reader downloads (:mod:`infermill.mirror`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infermill.errors import ConfigError

INFERMILL_DIR = "_infermill"
#: the job folder of a datatrove writer's local output without checkpoints_local_dir: OUTPUT.infermill, beside it
BESIDE_SUFFIX = ".infermill"
#: where ``infermill run --limit N`` writes, in the job's folder (or its checkpoint.dir)
TRIAL_DIR = "trial"
#: the queue's plan, in its folder: a job of the work queue is one with a plan
PLAN_FILE = "plan.json"


LOCAL_PROTOCOLS = ("file://", "local://")  # fsspec's names for the local file system
#: object stores whose conditional writes the work queue uses (infermill.queue_storage_s3)
QUEUE_STORE_PROTOCOLS = ("s3://",)
#: the environment that says which S3 store, and as whom (read by obstore and s3fs alike)
STORE_ENV_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ALLOW_HTTP",
)


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL of a file system other than the local one."""
    return "://" in path and not path.startswith(LOCAL_PROTOCOLS)


def local_path(path: str) -> str:
    """A local path or ``file://`` URL as an absolute path, ``~`` expanded."""
    for protocol in LOCAL_PROTOCOLS:
        path = path.removeprefix(protocol)
    return os.path.abspath(os.path.expanduser(path))


def split_store_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` as (``s3://bucket``, ``some/prefix``)."""
    protocol, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    return f"{protocol}://{bucket}", prefix.strip("/")


@dataclass(frozen=True, slots=True)
class JobLayout:
    """The paths of one job's own files (see the module docstring)."""

    root: Path  # OUTPUT/_infermill, ``checkpoints`` itself for a remote output, or a store's local mirror
    checkpoints: Path
    store: str | None = None  # ``s3://bucket``: the job's state is in that store, under ``store_root``
    store_root: Path | None = None  # (a key: ``prefix/_infermill``)
    #: how to reach the output (and its store): its storage options (fsspec's), empty for the environment's
    output_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def for_output(
        cls, output_folder: str, checkpoints_dir: str | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> JobLayout:
        """The layout of the job writing to ``output_folder`` (a path or URL, reached with
        ``storage_options``), its checkpoints in ``checkpoints_dir`` if given (a local folder),
        else in the output folder."""
        if checkpoints_dir is not None:
            if is_remote(checkpoints_dir):
                raise ConfigError(
                    f"checkpoint.dir (checkpoints_local_dir) must be a local folder, got {checkpoints_dir}"
                )
            checkpoints = Path(local_path(checkpoints_dir))
        elif output_folder.startswith(QUEUE_STORE_PROTOCOLS):
            store, prefix = split_store_url(output_folder.rstrip("/"))
            digest = hashlib.sha1(output_folder.rstrip("/").encode()).hexdigest()[:16]
            mirror = Path(tempfile.gettempdir()) / f"infermill-{os.getuid()}-{digest}" / INFERMILL_DIR
            return cls(mirror, mirror, store, Path(prefix) / INFERMILL_DIR, dict(storage_options or {}))
        elif is_remote(output_folder):
            raise ConfigError(
                f"the output {output_folder} is remote: its checkpoints need a local folder, so that a killed job "
                "can resume: set checkpoint.dir in the job file (checkpoints_local_dir in Python; --checkpoints "
                "for infermill status)"
            )
        else:
            checkpoints = Path(local_path(output_folder)) / INFERMILL_DIR / "checkpoints"
        root = checkpoints if is_remote(output_folder) else Path(local_path(output_folder)) / INFERMILL_DIR
        return cls(root, checkpoints, output_options=dict(storage_options or {}))

    @classmethod
    def outside_output(cls, output_folder: str, checkpoints_dir: str | None = None) -> JobLayout:
        """The layout of a job whose files must not be in its output folder (a datatrove writer's,
        which the next step reads whole): in ``checkpoints_dir`` (a local folder) if given, else in
        :func:`beside_output` of a local ``output_folder``; a remote one needs ``checkpoints_dir``."""
        if checkpoints_dir is None and is_remote(output_folder):
            raise ConfigError(
                f"the output {output_folder} is remote: the job's checkpoints need a local folder, so that a killed "
                "job can resume: set checkpoints_local_dir"
            )
        if checkpoints_dir is not None and is_remote(checkpoints_dir):
            raise ConfigError(f"checkpoints_local_dir must be a local folder, got {checkpoints_dir}")
        root = Path(local_path(checkpoints_dir)) if checkpoints_dir is not None else beside_output(output_folder)
        if not is_remote(output_folder) and root.resolve().is_relative_to(Path(local_path(output_folder)).resolve()):
            raise ConfigError(
                f"checkpoints_local_dir {checkpoints_dir} is inside the output folder {output_folder}, which the next "
                "step's reader reads whole: put it outside (e.g. beside it)"
            )
        return cls.at(root)

    @classmethod
    def at(cls, folder: str | os.PathLike[str]) -> JobLayout:
        """The layout of the job whose own folder (``OUTPUT/_infermill``'s contents) is ``folder``."""
        root = Path(local_path(os.fspath(folder)))
        return cls(root, root)

    def holds_job(self) -> bool:
        """Whether the job's folder holds a queue (a job's, or a stream's with one rank) or a stream's ranks."""
        return self.plan_file.is_file() or bool(self.rank_queues())

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        """Each worker's time series, ``WORKER.jsonl`` (:mod:`infermill.timeseries`)."""
        return self.root / "metrics"

    def series_file(self, worker: str) -> Path:
        """Worker ``worker``'s time series."""
        return self.metrics / f"{worker}.jsonl"

    @property
    def queue(self) -> Path:
        """The shared work queue's folder (``infermill.queue.WorkQueue``): a key path in the store
        for a job in one."""
        return (self.store_root if self.store_root is not None else self.root) / "queue"

    def where(self, path: Path | None = None) -> str:
        """``path`` (default: the job's folder) as a user knows it: for a job in a store, its URL
        (a path in the local mirror: the URL of what it mirrors)."""
        path = self.root if path is None else path
        if self.store is None or self.store_root is None:
            return str(path)
        if path.is_relative_to(self.root):
            path = self.store_root / path.relative_to(self.root)
        return f"{self.store}/{path.as_posix().lstrip('/')}"

    @property
    def plan_file(self) -> Path:
        """The queue's plan: a job of the work queue has one."""
        return self.queue / PLAN_FILE

    @property
    def worker_stats(self) -> Path:
        """Each worker run's stats so far, ``WORKER.json``, summed into ``stats.json``."""
        return self.root / "stats"

    def worker_stats_file(self, worker: str) -> Path:
        return self.worker_stats / f"{worker}.json"

    def worker_stats_files(self) -> list[Path]:
        return sorted(self.worker_stats.glob("*.json"))

    @property
    def slurm(self) -> Path:
        """The scripts of the job's Slurm submissions."""
        return self.root / "slurm"

    @property
    def report_file(self) -> Path:
        """Where ``infermill report`` writes its page by default."""
        return self.root / "report.html"

    @property
    def card_settings_file(self) -> Path:
        """The dataset card's settings, kept with the job (:mod:`infermill.card`)."""
        return self.root / "card.json"

    def rank_queue(self, rank: int, world_size: int) -> Path:
        """The queue folder of rank ``rank`` of a document stream of ``world_size`` ranks."""
        return self.queue if world_size == 1 else self.root / "ranks" / f"{rank:05d}"

    def rank_queues(self) -> list[Path]:
        """The queue folders of the job's ranks with several (a document stream's), in order."""
        folder = self.root / "ranks"
        return sorted(path for path in folder.iterdir() if path.name.isdigit()) if folder.is_dir() else []

    def legacy_ranks(self) -> list[int]:
        """The ranks of an older infermill's static-rank checkpoints here (``checkpoints/rank_*``)."""
        found = (path.name.removeprefix("rank_") for path in self.checkpoints.glob("rank_*") if path.is_dir())
        return sorted(int(name) for name in found if name.isdigit())

    def refuse_legacy_ranks(self) -> None:
        """Refuse (``ConfigError``, one line) a checkpoint folder written by an older infermill's
        static ranks (``checkpoints/rank_*``): this one does not read them."""
        if self.legacy_ranks():
            raise ConfigError(
                f"{self.checkpoints} holds checkpoints of static ranks written by an older infermill, which this one "
                "does not read: finish that job with the infermill that started it, or start over with --overwrite "
                "(overwrite=True), which deletes them and the output files they recorded"
            )

    def stats_file(self, rank: int, world_size: int) -> Path:
        return self.root / ("stats.json" if world_size == 1 else f"stats_rank_{rank:05d}.json")

    def stats_files(self) -> list[Path]:
        return sorted(self.root.glob("stats*.json"))

    @property
    def failures(self) -> Path:
        """The documents the workers skipped or failed, ``WORKER.jsonl``: one file per worker, never shared."""
        return self.root / "failures"

    def failures_file(self, worker: str) -> Path:
        return self.failures / f"{worker}.jsonl"

    def failures_files(self) -> list[Path]:
        return sorted(self.failures.glob("*.jsonl"))

    def check_writable(self) -> None:
        """Make the job's own folders and write a file in each, so that a folder that cannot be
        written is found before a server is launched and inference spent; a ``ConfigError``
        names the folder and the reason."""
        for folder in dict.fromkeys((self.root, self.checkpoints)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".infermill-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise ConfigError(
                    f"cannot write to {folder}: {e.strerror or e}; choose another output path (or checkpoint.dir), "
                    "or make that folder writable"
                ) from None


def beside_output(output_folder: str) -> Path:
    """``OUTPUT.infermill``: the job folder beside a local output folder (the same parent, and so
    almost always the same file system: a chunk's file staged there is renamed into place)."""
    output = Path(local_path(output_folder))
    if not output.name:
        raise ConfigError(
            f"the output {output} has no folder beside it for the job's files: set checkpoints_local_dir (a folder "
            "outside the output)"
        )
    return output.with_name(output.name + BESIDE_SUFFIX)


def series_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The workers' series files in ``folder``, in name order (a writer's temporary file left out)."""
    try:
        return sorted(path for path in Path(folder).glob("*.jsonl") if not path.name.startswith("."))
    except OSError:
        return []
