"""A datatrove script as a datatrove user writes it, with infermill's runner in place of
datatrove's (the one changed import). Run by tests/test_datatrove.py in its own process:
``python datatrove_pipeline.py INPUT OUTPUT CHECKPOINTS LOGS [DELAY_SEC]``."""

from __future__ import annotations

import asyncio
import sys

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from infermill import InferenceConfig, InferenceRunner


async def rollout(document, generate, delay: float = 0.0):
    """None for documents whose text says so (they end with no results, and are not written)."""
    if delay:
        await asyncio.sleep(delay)
    if "none" in document.text:
        return None
    return await generate({"messages": [{"role": "user", "content": document.text}]})


def main(input_folder: str, output_folder: str, checkpoints: str, logs: str, delay: str = "0") -> None:
    config = InferenceConfig(
        server_type="dummy",
        model_name_or_path="dummy-model",
        request_timeout=10.0,
        server_ready_delay_sec=0.1,
        # slowed down, one document at a time: the chunks finish one after another, so a kill lands
        # between them (all at once, they could all be written before it)
        max_concurrent_generations=1 if float(delay) else 500,
    )
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(input_folder),
            InferenceRunner(
                rollout_fn=rollout,
                config=config,
                output_writer=JsonlWriter(output_folder, output_filename="${rank}_chunk_${chunk_index}.jsonl"),
                shared_context={"delay": float(delay)},
                checkpoints_local_dir=checkpoints,
                records_per_chunk=3,
            ),
        ],
        tasks=2,
        logging_dir=logs,
    ).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
