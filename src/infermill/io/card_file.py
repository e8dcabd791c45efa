"""The dataset card's file in an output folder (``README.md``): what tells one infermill wrote,
and which data file names ``datasets`` can load by a card. :mod:`infermill.card` writes cards;
this is what the layers below it (the job file's checks, a job's discard) need of them."""

from __future__ import annotations

import re
from typing import Any

import yaml

CARD_FILE = "README.md"
TAG = "infermill"
#: the data file names ``datasets`` loads by a card's ``configs`` (an extension it reads, then compression)
LOADABLE = re.compile(r"\.(jsonl|json|parquet)(\.(gz|zst|bz2|xz|lz4))?$")


def discard_card(fs: Any, root: str) -> None:
    """Delete the card in the output folder ``root`` of ``fs`` if infermill wrote it (its front
    matter has the infermill tag): a job started over discards the files it names."""
    path = f"{root.rstrip('/')}/{CARD_FILE}"
    try:
        with fs.open(path, "rb") as file:
            head = file.read(1 << 20).decode("utf-8", "replace")
    except FileNotFoundError:
        return
    if is_infermill_card(head):
        fs.rm(path)


def is_infermill_card(text: str) -> bool:
    """Whether the card ``text`` is one infermill wrote: its front matter has the infermill tag."""
    if not text.startswith("---\n"):
        return False
    try:
        front = yaml.safe_load(text[4:].partition("\n---\n")[0])
    except yaml.YAMLError:
        return False
    tags = front.get("tags") if isinstance(front, dict) else None
    return isinstance(tags, list) and TAG in tags
