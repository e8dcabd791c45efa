"""From a validated job file to a running ``InferenceRunner``."""

from __future__ import annotations

import functools
from typing import Any

from infermill.cache import RequestCache
from infermill.config import without_credentials
from infermill.cost import prices_of
from infermill.errors import InfermillError
from infermill.io.readers import DocumentReader
from infermill.io.writers import WRITERS, OpenAIBatchWriter, OutputWriter, ParquetWriter
from infermill.jobfile import JobConfig
from infermill.rollouts import OpenAIBatchRollout, PromptRollout, load_function
from infermill.runner import InferenceRunner
from infermill.types import Document


def build_reader(job: JobConfig) -> DocumentReader:
    spec = job.input
    return DocumentReader(
        spec.path,
        spec.format,
        spec.text_key,
        spec.id_key,
        spec.limit,
        job.runner.on_bad_record,
        storage_options=spec.storage_options,
    )


def build_writer(job: JobConfig) -> OutputWriter:
    spec = job.output
    options = spec.storage_options
    if spec.format == "openai_batch":
        return OpenAIBatchWriter(
            spec.path, spec.filename, spec.compression, results_key=job.runner.metadata_key, storage_options=options
        )
    if spec.format == "parquet":
        metadata = spec.parquet_metadata or "struct"
        return ParquetWriter(spec.path, spec.filename, spec.compression, metadata, storage_options=options)
    return WRITERS[spec.format](spec.path, spec.filename, spec.compression, storage_options=options)


def build_rollout(job: JobConfig) -> Any:
    r = job.rollout
    if job.input.format == "openai_batch":
        return OpenAIBatchRollout()
    if r.function:
        return load_function(r.function)
    messages = [message.model_dump() for message in r.messages] if r.messages else None
    return PromptRollout(
        job.inference.use_chat,
        r.template,
        r.prompt_key,
        r.messages_key,
        r.system_prompt,
        messages,
        text_key=job.input.text_key,
        response_format=r.response_format,
        response_retries=r.response_retries,
    )


def build_shared_context(job: JobConfig) -> Any:
    """The function rollout's shared context: ``rollout.shared_context`` called (once per run,
    by the runner) with ``shared_context_kwargs``; None without one."""
    r = job.rollout
    if not r.shared_context:
        return None
    return functools.partial(load_function(r.shared_context, "rollout.shared_context"), **r.shared_context_kwargs)


def request_cache(job: JobConfig) -> RequestCache | None:
    """The job's request cache (its ``cache`` section); None without one."""
    return RequestCache(job.cache.path, job.cache.storage_options) if job.cache is not None else None


def check_rollout(rollout: Any, reader: DocumentReader) -> None:
    """Check the templates of a prompt ``rollout`` on the input's first document (``ConfigError``
    naming a placeholder that is no field of it), before any request is sent."""
    if not getattr(rollout, "fills_in_fields", False):
        return
    try:
        first = next((item for item in reader.read(0, 1) if isinstance(item, Document)), None)
    except (InfermillError, OSError, ValueError, EOFError):
        return  # an input that cannot be read: planning the job says so, as for any rollout
    if first is not None:
        rollout.check(first)


def rollout_settings(job: JobConfig) -> dict[str, Any]:
    """The job file's rollout section as the job's identity records it: readable, so that a
    refused resume names the setting that changed (``rollout.prompt_key``), not a digest;
    ``shared_context_kwargs`` without credentials."""
    # (the newer keys only when given: a job of an infermill without them resumes as the same job)
    unset = {"messages", "response_format", "response_retries"} - job.rollout.model_fields_set
    excluded = {"shared_context_kwargs", "prefix_key", *unset}  # (prefix_key orders requests: no reply changes)
    settings = job.rollout.model_dump(mode="json", exclude=excluded)
    if job.rollout.shared_context_kwargs:
        settings["shared_context_kwargs"] = without_credentials(job.rollout.shared_context_kwargs)
    return settings


def build_runner(
    job: JobConfig, reader: DocumentReader, overwrite: bool = False, accept_changed_input: bool = False
) -> InferenceRunner:
    """The job's runner; its identity includes the files ``reader`` reads, with their sizes and
    modification times, so that a resume over changed input is refused."""
    return InferenceRunner(
        build_rollout(job),
        job.inference,
        build_writer(job),
        shared_context=build_shared_context(job),
        checkpoints_local_dir=job.checkpoint.dir,
        records_per_chunk=job.checkpoint.records_per_chunk,
        metadata_key=job.runner.metadata_key,
        skip_bad_requests=job.runner.skip_bad_requests,
        generated_text=job.runner.generated_text,
        prices=prices_of(job.cost, job.inference),
        cache=request_cache(job),
        job_identity={
            # (not how it is reached: an endpoint or credentials that change do not change the job)
            "input": job.input.model_dump(mode="json", exclude={"limit", "storage_options"}),
            "input_files": reader.fingerprint(),
            "rollout_settings": rollout_settings(job),
        },
        overwrite=overwrite,
        accept_changed_input=accept_changed_input,
        prefix_key=job.rollout.prefix_key,
    )
