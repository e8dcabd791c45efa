"""Output writers. A data file appears only whole: it is written under a temporary
name and renamed when its chunk is closed. File names take ``${rank}`` and
``${chunk_index}``. Paths go through fsspec, so ``s3://`` and friends work.
"""

from __future__ import annotations

import os
from string import Template
from typing import IO, Any

import fsspec
import orjson

INFERMILL_DIR = "_infermill"


class OutputWriter:
    """Base class: writes records to files named from ``output_filename`` under ``output_folder``."""

    default_filename = "${rank}.jsonl"

    def __init__(self, output_folder: str, output_filename: str | None = None):
        self.output_folder = output_folder.rstrip("/")
        self.output_filename = output_filename or self.default_filename
        self.fs, self._root = fsspec.core.url_to_fs(self.output_folder)
        self._open: dict[str, tuple[str, IO[bytes]]] = {}

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def filename(self, rank: int, chunk_index: int = 0) -> str:
        return Template(self.output_filename).safe_substitute(rank=f"{rank:05d}", chunk_index=f"{chunk_index:05d}")

    def write(self, record: dict[str, Any], rank: int = 0, chunk_index: int = 0) -> None:
        name = self.filename(rank, chunk_index)
        entry = self._open.get(name)
        if entry is None:
            final = f"{self._root}/{name}"
            self.fs.makedirs(os.path.dirname(final) or self._root, exist_ok=True)
            temp = f"{final}.{os.getpid()}.tmp"
            entry = self._open[name] = (temp, self.fs.open(temp, "wb"))
        self._write_record(entry[1], record)

    def _write_record(self, file: IO[bytes], record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close_chunk(self, rank: int = 0, chunk_index: int = 0) -> None:
        """Finish one file: close it and move it to its final name."""
        name = self.filename(rank, chunk_index)
        entry = self._open.pop(name, None)
        if entry is not None:
            temp, file = entry
            file.close()
            self.fs.mv(temp, f"{self._root}/{name}")

    def close(self) -> None:
        """Finish every open file."""
        for name in list(self._open):
            temp, file = self._open.pop(name)
            file.close()
            self.fs.mv(temp, f"{self._root}/{name}")

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class JsonlWriter(OutputWriter):
    """One JSON object per line."""

    def _write_record(self, file: IO[bytes], record: dict[str, Any]) -> None:
        file.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY))
