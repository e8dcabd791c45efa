"""A datatrove script as a datatrove user writes it, with infermill's runner in place of
datatrove's (the one changed import). Run by tests/test_datatrove.py in its own process:

    python datatrove_pipeline.py INPUT OUTPUT CHECKPOINTS LOGS [--delay SEC] [--writer datatrove|infermill]
                                 [--media] [--faulty-stats PATH] [--metric-interval SEC]
                                 [--executor local | --executor slurm --partition P --job-name N
                                  | --executor ray --ray-address HOST:PORT]

``--writer infermill``: infermill's own JsonlWriter instead of datatrove's. ``--media``: each
document gets a media item with bytes of its own (a step between the reader and the runner).
``--faulty-stats``: the faulty test server (its request counters in PATH) instead of the dummy
one, with ``skip_bad_requests`` (a document whose text holds ``fail400`` is rejected), in one task.
``--metric-interval``: seconds between progress lines (datatrove's config field).
``--executor``: datatrove's executor, configured as a user configures it for the test cluster:
``slurm`` submits the array (its job, and datatrove's stats-merging job, named ``--job-name``) with
sbatch and returns; the job's environment is this one (sbatch's ``--export=ALL``: ``PYTHONPATH``
finds infermill), the venv beside this interpreter activated. ``ray`` runs the tasks on the Ray
cluster at ``--ray-address``, their environment carrying this one's ``PYTHONPATH`` (and the tests'
tag, so that a process left behind is found)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from datatrove.data import Media, MediaType
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from infermill import InferenceConfig, InferenceRunner
from infermill.io.writers import JsonlWriter as InfermillJsonlWriter

FAULTY_SERVER = Path(__file__).parent / "servers" / "faulty_server.py"


async def rollout(document, generate, delay: float = 0.0):
    """None for documents whose text says so (they end with no results, and are not written)."""
    if delay:
        await asyncio.sleep(delay)
    if "none" in document.text:
        return None
    return await generate({"messages": [{"role": "user", "content": document.text}]})


def media_bytes(doc_id: str) -> bytes:
    """Bytes of every value (0..255, not UTF-8), different for each document."""
    return doc_id.encode() + bytes(range(256))


def add_media(data, rank: int = 0, world_size: int = 1):
    """A pipeline step: each document gets a media item holding bytes."""
    for document in data:
        document.media.append(
            Media(id=f"m-{document.id}", type=MediaType.IMAGE, url="", media_bytes=media_bytes(document.id))
        )
        yield document


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("checkpoints")
    p.add_argument("logs")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--writer", choices=["datatrove", "infermill"], default="datatrove")
    p.add_argument("--media", action="store_true")
    p.add_argument("--faulty-stats")
    p.add_argument("--metric-interval", type=float)
    p.add_argument("--executor", choices=["local", "slurm", "ray"], default="local")
    p.add_argument("--partition")
    p.add_argument("--job-name", default="infermill-datatrove")
    p.add_argument("--ray-address")
    args = p.parse_args()

    server: dict = {"server_type": "dummy", "model_name_or_path": "dummy-model"}
    if args.faulty_stats:
        server = {
            "server_type": "custom",
            "model_name_or_path": "faulty-model",
            "model_kwargs": {"server_script": str(FAULTY_SERVER), "stats_file": args.faulty_stats},
        }
    config = InferenceConfig(
        **server,
        request_timeout=10.0,
        server_ready_delay_sec=0.1,
        # slowed down, one document at a time: the chunks finish one after another, so a kill lands
        # between them (all at once, they could all be written before it)
        max_concurrent_generations=1 if args.delay else 500,
        **({"metric_interval": args.metric_interval} if args.metric_interval else {}),
    )
    if args.writer == "infermill":
        writer = InfermillJsonlWriter(args.output, output_filename="${rank}_chunk_${chunk_index}.jsonl.gz")
    else:
        writer = JsonlWriter(args.output, output_filename="${rank}_chunk_${chunk_index}.jsonl", save_media_bytes=True)
    pipeline = [
        JsonlReader(args.input),
        *([add_media] if args.media else []),
        InferenceRunner(
            rollout_fn=rollout,
            config=config,
            output_writer=writer,
            shared_context={"delay": args.delay},
            checkpoints_local_dir=args.checkpoints,
            records_per_chunk=3,
            skip_bad_requests=bool(args.faulty_stats),
        ),
    ]
    tasks = 1 if args.faulty_stats else 2  # one server: its counters in one file
    if args.executor == "slurm":
        SlurmPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            time="00:10:00",
            partition=args.partition,
            job_name=args.job_name,
            qos="",  # a cluster without accounting has no QOS to name (datatrove's default: "normal")
            mem_per_cpu_gb=1,
            venv_path=str(Path(sys.executable).parent / "activate"),
            logging_dir=args.logs,
        ).run()
    elif args.executor == "ray":
        import ray

        env_vars = {name: os.environ[name] for name in ("PYTHONPATH", "INFERMILL_TEST_TAG") if name in os.environ}
        ray.init(address=args.ray_address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        try:
            RayPipelineExecutor(pipeline=pipeline, tasks=tasks, mem_per_cpu_gb=1, logging_dir=args.logs).run()
        finally:
            ray.shutdown()
    else:
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=args.logs).run()


if __name__ == "__main__":
    main()
