"""``InferenceRunner``: documents in, rollouts through the server, results out.

The runner is the public API: it holds the job's configuration, and its methods run the
lifecycles of :mod:`infermill.lifecycles` (a rank's document stream, a worker on the shared
queue), each around the per-document engine of :mod:`infermill.engine`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterable, Iterable
from typing import Any

from infermill.cache import RequestCache
from infermill.config import InferenceConfig
from infermill.cost import Prices
from infermill.engine import DocumentEngine, RolloutFn
from infermill.errors import ConfigError
from infermill.io.readers import DocumentReader
from infermill.io.writers import OutputWriter
from infermill.layout import JobLayout
from infermill.lifecycles import run_queue_worker, run_rank
from infermill.metrics import ProgressSnapshot
from infermill.ordering import PrefixKey, document_key
from infermill.retry import RetryPolicy
from infermill.servers import InferenceServer, ServerState
from infermill.worker import QueueOptions


class InferenceRunner:
    """Runs ``rollout_fn(document, generate, **shared_context)`` over documents and writes the results.

    Args:
        rollout_fn: async function; may call ``generate`` any number of times, one after another
            or concurrently; returns an ``InferenceResult``, any JSON value, or None.
        config: the server and request configuration.
        output_writer: where documents with results are written (e.g. ``JsonlWriter``).
        shared_context: a dict, a context manager, or a callable returning either, entered once per run;
            its dict is passed to every rollout as keyword arguments.
        checkpoints_local_dir: where the job's own files go when the output is remote (a local
            folder; by default, and for a local output, ``_infermill`` of the output folder). With a
            datatrove writer, for any output: its folder holds only the output, the job's files are
            here, by default in ``OUTPUT.infermill`` beside a local output.
        records_per_chunk: documents per output chunk, each a unit of the rank's work queue (a
            datatrove writer whose file name has no ``${chunk_index}``: the rank's whole output is
            one chunk, as one file).
        metadata_key: the metadata key under which the list of rollout results is stored.
        skip_bad_requests: skip (and record) documents the server rejected as bad requests,
            instead of failing the job.
        job_identity: what else identifies the job (its input), checked when a run resumes.
        prices: what the job costs (``infermill.cost.Prices``): its spend and forecast in its stats, and
            its budget (over it, a queue worker stops: ``BudgetExceededError``).
        cache: the request cache (:class:`~infermill.cache.RequestCache`, or its folder or URL):
            replies kept across runs and jobs, keyed by the request; identical requests are sent once.
        generated_text: also write the first result's text as the record's top-level
            ``generated_text`` (a column in Parquet), beside the results under ``metadata_key``.
        prefix_key: with ``config.prefix_window``, what orders the documents so that those sharing a
            prompt prefix are sent together: a field of the record (its text, or a metadata field)
            or a function of the document returning text; None: a built-in rollout's prompt (a
            function rollout needs one).
        overwrite: discard the checkpoint and output files of an earlier run and start over.
        accept_changed_input: resume although the input files changed since the checkpoint was
            written (for records fixed in place: the same records, in the same order).

    The runner holds configuration only: each :meth:`run_async` call keeps its state in its own
    run (a :class:`~infermill.engine.DocumentEngine`, in :mod:`infermill.lifecycles`), so that
    several (e.g. two ranks) can run at once on one runner. A rank's documents are a stream read
    once, cut into units of ``records_per_chunk`` as it is read: the units of a work queue whose
    only holder is the rank (:mod:`infermill.stream`), which ``infermill status`` and
    ``infermill report`` read as a job of ``infermill run``.

    It is also a datatrove pipeline step (``pipeline=[reader, InferenceRunner(...), ...]``): the
    executor's ``step(data, rank, world_size)`` runs the documents its upstream step yields (this
    rank's stream, as :meth:`run`; see :mod:`infermill.datatrove_compat`) and, as datatrove's
    runner, passes nothing downstream: the documents go to ``output_writer``, which may be a
    datatrove ``DiskWriter``. datatrove need not be installed for this: the step is a plain callable.
    """

    name = "Inference 🔍"  # what datatrove's executors show for a step
    type = "Model call"
    #: the last rank's stats as a datatrove ``Stats``, once run as a datatrove step (absent before:
    #: datatrove's executors save the stats of the steps that have them)
    stats: Any

    def __init__(
        self,
        rollout_fn: RolloutFn,
        config: InferenceConfig,
        output_writer: OutputWriter,
        shared_context: Any = None,
        checkpoints_local_dir: str | None = None,
        records_per_chunk: int = 6000,
        metadata_key: str = "rollout_results",
        skip_bad_requests: bool = False,
        job_identity: dict[str, Any] | None = None,
        generated_text: bool = False,
        prices: Prices | None = None,
        cache: RequestCache | str | None = None,
        overwrite: bool = False,
        accept_changed_input: bool = False,
        prefix_key: PrefixKey | None = None,
    ):
        if records_per_chunk <= 0:
            raise ValueError(f"records_per_chunk must be > 0, got {records_per_chunk}")
        self.rollout_fn = rollout_fn
        self.config = config
        # with a datatrove writer, a document with no results is also marked as datatrove marks it
        self.no_results_marks: dict[str, Any] = {}
        self.layout: JobLayout
        if not isinstance(output_writer, OutputWriter):  # a datatrove writer: the job's files outside its folder
            from infermill.datatrove_compat import NO_ROLLOUTS_MARK, adapt_writer

            output_writer, records_per_chunk, self.layout = adapt_writer(
                output_writer, checkpoints_local_dir, records_per_chunk
            )
            self.no_results_marks = {NO_ROLLOUTS_MARK: True}
        else:
            self.layout = JobLayout.for_output(
                output_writer.output_folder, checkpoints_local_dir, output_writer.storage_options
            )
        self.output_writer = output_writer
        self.shared_context = shared_context
        self.records_per_chunk = records_per_chunk
        self.metadata_key = metadata_key
        self.skip_bad_requests = skip_bad_requests
        self.job_identity = dict(job_identity or {})
        self.generated_text = generated_text
        self.prices = prices
        self.cache = RequestCache(cache) if isinstance(cache, str) else cache
        self.overwrite = overwrite
        self.accept_changed_input = accept_changed_input
        self.retry_policy = RetryPolicy.from_config(config)
        self.prefix_key = document_key(prefix_key, rollout_fn, config.prefix_window)
        self._runs: list[DocumentEngine] = []  # the runs in progress

    # -- entry points -------------------------------------------------------------------

    def __call__(
        self, data: Iterable[Any] | AsyncIterable[Any] | None = None, rank: int = 0, world_size: int = 1
    ) -> None:
        """A datatrove pipeline step's call: run ``data`` (the upstream step's documents) as
        :meth:`run` does; yield nothing downstream, as datatrove's runner. The rank's stats are then
        the step's ``stats`` (a datatrove ``Stats``), which datatrove's executors save."""
        from infermill.datatrove_compat import run_step

        run_step(self, data, rank, world_size)

    def __repr__(self) -> str:
        return f"{self.type}: {self.name}"

    def run(
        self,
        documents: Iterable[Any] | AsyncIterable[Any],
        rank: int = 0,
        world_size: int = 1,
        *,
        live: bool | None = None,
    ) -> dict[str, Any]:
        """Process ``documents`` to the end, showing progress (a live line on a terminal, unless
        ``live`` is False: log lines); return the stats (also written as ``stats.json``).
        ``run_async`` is the same without the progress display."""
        from infermill.eventloop import run_coroutine
        from infermill.progress import log_interval, show_progress

        async def run_with_progress() -> dict[str, Any]:
            progress = asyncio.create_task(show_progress(self.progress, interval=log_interval(self.config), live=live))
            try:
                return await self.run_async(documents, rank, world_size)
            finally:
                progress.cancel()

        return run_coroutine(run_with_progress())

    async def run_async(
        self,
        documents: Iterable[Any] | AsyncIterable[Any],
        rank: int = 0,
        world_size: int = 1,
        server: InferenceServer | None = None,
    ) -> dict[str, Any]:
        """Like :meth:`run`, in a running event loop. ``server``: an already started server to use
        (its owner stops it); by default one is made from the config, started and stopped here."""
        if self.layout.store is not None:  # (`infermill run` keeps a job's state in the store)
            raise ConfigError(
                f"the output {self.output_writer.output_folder} is remote: a run of documents keeps its checkpoints "
                "in a local folder, so that a killed run can resume: set checkpoints_local_dir"
            )
        return await run_rank(self, self._runs, documents, rank, world_size, server)

    async def run_queue_async(
        self, reader: DocumentReader, server: InferenceServer | None = None, options: QueueOptions | None = None
    ) -> dict[str, Any]:
        """Work on the job's shared queue (:mod:`infermill.worker`) as one worker, with as many
        others as are started anywhere, until every unit is done or failed; return this worker's
        stats (``stats.json`` sums every worker's). Raise ``InfermillError`` naming the failed
        units if any failed. ``server`` as in :meth:`run_async`.

        With ``options.max_worker_restarts``, a server that fails for good while units are held
        does not end the worker: those units spend an attempt and the worker starts again, with a
        new server and a new worker id, as long as :class:`~infermill.worker.WorkerDeaths` agrees."""
        return await run_queue_worker(self, self._runs, reader, server, options or QueueOptions())

    def progress(self, server: InferenceServer | None = None) -> ProgressSnapshot:
        """What the runs in progress have done so far (all of them together), and whether a server
        is still starting or restarting (the one waited for longest), since when. ``server``: one
        launched for the run to come, shown until a run has begun (the job is set up meanwhile)."""
        progress = ProgressSnapshot.of(
            [(run.stats, run.server.restarts if run.server else 0, run.documents_total) for run in self._runs]
        )
        if self.prices is not None and self._runs:  # what this command's runs cost so far
            progress = dataclasses.replace(progress, cost=sum(run.cost_so_far() or 0.0 for run in self._runs))
        servers = [run.server for run in self._runs if run.server is not None] or ([server] if server else [])
        waiting = [server for server in servers if server.state in (ServerState.STARTING, ServerState.RESTARTING)]
        if waiting:
            server = min(waiting, key=lambda server: server.state_since)
            progress = dataclasses.replace(
                progress, server_waiting=server.state.value, server_waiting_sec=time.monotonic() - server.state_since
            )
        return progress

    def identity(self, rank: int | None = None, world_size: int | None = None) -> dict[str, Any]:
        """What a checkpoint must have been written by to be resumed (with the static rank, if
        any): everything that changes what is written (input, rollout, model and generation
        settings, output), nothing that may change between runs (see
        ``InferenceConfig.reply_identity``)."""
        rollout = getattr(self.rollout_fn, "identity", None) or (
            f"{getattr(self.rollout_fn, '__module__', '?')}:{getattr(self.rollout_fn, '__qualname__', '?')}"
        )
        ranks = {"rank": rank, "world_size": world_size} if rank is not None else {}
        return {
            **self.job_identity,
            **ranks,
            "records_per_chunk": self.records_per_chunk,
            "rollout": rollout,
            "rollouts_per_document": self.config.rollouts_per_document,
            "output": f"{self.output_writer.output_folder}/{self.output_writer.output_filename}",
            "metadata_key": self.metadata_key,
            **({"generated_text": True} if self.generated_text else {}),  # (an older job's identity as it was)
            "inference": self.config.reply_identity(),
        }
