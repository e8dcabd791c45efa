"""The file system of a path or URL, through fsspec, with errors a user can act on."""

from __future__ import annotations

from typing import Any

from infermill.errors import ConfigError


def url_to_fs(url: str) -> tuple[Any, str]:
    """fsspec's file system for ``url`` and the path in it. A backend that is not installed
    (``s3://`` without s3fs) or an unknown protocol is a ``ConfigError`` naming the URL and,
    where fsspec knows it, the package to install."""
    import fsspec  # here, not at the top: a job file names formats without paying for fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise ConfigError(f"{url}: {e} (pip install it into infermill's environment)") from None
    except ValueError as e:
        raise ConfigError(f"{url}: {e}; check the path") from None
