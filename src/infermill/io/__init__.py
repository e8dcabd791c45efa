"""Reading documents and writing results."""

from infermill.io.writers import WRITERS, JsonlWriter, OpenAIBatchWriter, OutputWriter, ParquetWriter

__all__ = ["WRITERS", "JsonlWriter", "OpenAIBatchWriter", "OutputWriter", "ParquetWriter"]
