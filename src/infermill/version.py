"""infermill's version: in a module of its own, which the package and its modules (the
client's User-Agent) import without importing the package's public API."""

__version__ = "0.1.0"
