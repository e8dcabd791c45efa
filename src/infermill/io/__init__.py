"""Reading documents and writing results."""

from infermill.io.writers import JsonlWriter, OutputWriter

__all__ = ["JsonlWriter", "OutputWriter"]
