#!/usr/bin/env python
"""A short OpenAI-compatible server on Hugging Face transformers that batches concurrent requests.

    python examples/servers/batching_server.py --port 8000 --model .venv/models/SmolLM2-135M-Instruct

(a folder made by examples/servers/convert_smollm2.py). Requests wait in a queue while the model
is busy; then the waiting requests that share sampling settings (up to --max-batch-size) go through
one left-padded ``generate`` call. Serves GET /v1/models, POST /v1/chat/completions and
/v1/completions (``max_tokens``, ``temperature``, ``top_p``; no stop strings, no streaming).
Unknown flags are ignored, so any job's ``model_kwargs`` can point at it.
"""

import argparse
import asyncio
import contextlib
import os
import time
import uuid

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve the HTTP loop on small CPUs

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, AutoTokenizer


class Batcher:
    """Runs queued prompts through the model, one ``generate`` call per batch, in a worker thread."""

    def __init__(self, model, tokenizer, max_batch_size: int, gather_sec: float):
        self.model, self.tokenizer, self.max_batch_size, self.gather_sec = model, tokenizer, max_batch_size, gather_sec
        eos = model.generation_config.eos_token_id
        self.eos = set(eos) if isinstance(eos, list) else {eos}
        self.queue: list[tuple[str, dict, asyncio.Future]] = []
        self.wake = asyncio.Event()

    async def submit(self, prompt: str, params: dict) -> tuple[int, list[int]]:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((prompt, params, future))
        self.wake.set()
        return await future  # (prompt tokens, new tokens), once the prompt's batch has run

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(self.gather_sec)  # let a burst of requests arrive, to batch them together
            self.wake.clear()
            while self.queue:  # one batch: the oldest request and those that sample like it
                sampling = self.queue[0][1]["sampling"]
                batch = [item for item in self.queue if item[1]["sampling"] == sampling][: self.max_batch_size]
                self.queue = [item for item in self.queue if all(item is not taken for taken in batch)]
                longest = max(params["max_tokens"] for _, params, _ in batch)
                print(f"batching_server: {len(batch)} requests in one batch, {len(self.queue)} waiting", flush=True)
                try:
                    results = await asyncio.to_thread(self.generate, [p for p, _, _ in batch], sampling, longest)
                except Exception as e:  # a failed batch fails its requests, not the server
                    results = [e] * len(batch)
                for (_, _, future), result in zip(batch, results):
                    if not future.done():  # done: cancelled, the client went away
                        future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)

    def generate(self, prompts: list[str], sampling: tuple, max_tokens: int) -> list[tuple[int, list[int]]]:
        temperature, top_p = sampling
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        options = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature else dict(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, **options
            )
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        return [(int(mask.sum()), row) for mask, row in zip(inputs["attention_mask"], new)]


def parse(body: dict, chat: bool, tokenizer) -> tuple[str, dict]:
    """The prompt text and generation settings of a request; ``ValueError`` (HTTP 400) when they make no sense."""
    if chat:
        try:
            prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # missing or malformed messages
            raise ValueError(f"messages must be a list of {{role, content}} objects ({e!r})") from None
    elif isinstance(body.get("prompt"), str):
        prompt = body["prompt"]
    else:
        raise ValueError("prompt must be a string")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens")) or 256
    if type(max_tokens) is not int or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    if not all(type(x) in (int, float) for x in (temperature, top_p)) or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature!r} and {top_p!r}")
    return prompt, {"max_tokens": max_tokens, "sampling": (float(temperature), float(top_p))}


def build_app(batcher: Batcher, tokenizer, name: str) -> web.Application:
    async def complete(request: web.Request, chat: bool) -> web.Response:
        try:
            body = await request.json()
            prompt, params = parse(body if isinstance(body, dict) else {}, chat, tokenizer)
        except ValueError as e:  # bad JSON or bad fields: the client's fault
            return web.json_response({"error": {"message": str(e), "type": "invalid_request_error"}}, status=400)
        prompt_tokens, tokens = await batcher.submit(prompt, params)
        tokens = tokens[: params["max_tokens"]]  # the batch ran to its longest request's limit
        ends = [i for i, t in enumerate(tokens) if t in batcher.eos]
        tokens, reason = (tokens[: ends[0] + 1], "stop") if ends else (tokens, "length")
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        choice = {"index": 0, "finish_reason": reason}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)}
        usage["total_tokens"] = prompt_tokens + len(tokens)
        kind = "chat.completion" if chat else "text_completion"
        reply = {"id": f"cmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time())}
        reply |= {"model": body.get("model") or name, "choices": [choice], "usage": usage}
        return web.json_response(reply)

    app = web.Application(client_max_size=64 * 2**20)
    models = {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "local"}]}
    app.router.add_get("/v1/models", lambda _: web.json_response(models))
    app.router.add_post("/v1/chat/completions", lambda request: complete(request, chat=True))
    app.router.add_post("/v1/completions", lambda request: complete(request, chat=False))
    return app


async def serve(args, model, tokenizer) -> None:
    batcher = Batcher(model, tokenizer, args.max_batch_size, args.gather_sec)
    worker = asyncio.create_task(batcher.run())
    runner = web.AppRunner(build_app(batcher, tokenizer, os.path.basename(args.model.rstrip("/"))))
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"batching_server: serving {args.model} on http://{args.host}:{args.port}/v1", flush=True)
    print("Application startup complete.", flush=True)  # a ready line infermill knows
    await worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", required=True, help="a model folder (or hub name)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--gather-sec", type=float, default=0.02, help="wait this long for more requests")
    args, _ = parser.parse_known_args()  # flags meant for other servers are ignored
    if os.sep in args.model and not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: no such folder (python examples/servers/convert_smollm2.py makes it)")
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args, model, tokenizer))


if __name__ == "__main__":
    main()
