"""Import a module without waiting for the CA bundle its import loads.

aiohttp builds its two default SSL contexts when it is imported, and each reads and parses
the system CA bundle: with OpenSSL 3 that takes 40-100 ms apiece, a third of aiohttp's import
and the largest single piece of ``infermill run``'s start-up, for contexts that a run against
its own local server never uses. :func:`import_loading_ca_in_background` leaves that loading
to a thread, where it runs beside the rest of start-up (CPython releases the GIL around it,
since 3.10.6). Until it is done, those contexts finish the loading themselves before any TLS
handshake, so no connection ever sees a context without its certificates; a fork waits for
it too. Only contexts of the standard library's own class are deferred: a subclass (such as
truststore's) loads at once, as usual.
"""

from __future__ import annotations

import importlib
import logging
import os
import ssl
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger("infermill")

_STDLIB_CONTEXT: type = next(cls for cls in type.mro(ssl.SSLContext) if cls.__module__ == "ssl")
_import_lock = threading.RLock()
_pending: list[_PendingLoad] = []


class _PendingLoad:
    """The contexts one import deferred. :meth:`finish` loads them: from the background
    thread, or first from whoever needs them earlier (the others then wait on the lock)."""

    def __init__(self, load: Callable[[ssl.SSLContext], None]):
        self._load = load
        self._lock = threading.Lock()
        self._contexts: list[ssl.SSLContext] = []
        self._context_class = _loading_class(self)

    def defer(self, context: ssl.SSLContext) -> bool:
        try:
            context.__class__ = self._context_class
        except (TypeError, AttributeError):
            return False
        self._contexts.append(context)
        return True

    @property
    def done(self) -> bool:
        return not self._contexts

    def finish(self) -> None:
        with self._lock:
            while self._contexts:
                context = self._contexts[-1]
                try:
                    self._load(context)
                except Exception as e:  # at import time, this would have failed the import
                    logger.warning("could not load the system CA certificates: %s", e)
                context.__class__ = _STDLIB_CONTEXT
                self._contexts.pop()


def _loading_class(pending: _PendingLoad) -> type:
    """The class of a context until ``pending`` has loaded it: TLS on it finishes the load first."""

    class CertificatesLoading(_STDLIB_CONTEXT):  # type: ignore[misc, valid-type]
        def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
            pending.finish()
            return _STDLIB_CONTEXT.wrap_socket(self, *args, **kwargs)

        def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:  # asyncio's and uvloop's TLS
            pending.finish()
            return _STDLIB_CONTEXT.wrap_bio(self, *args, **kwargs)

    return CertificatesLoading


def import_loading_ca_in_background(name: str) -> ModuleType:
    """``import name``, with the CA bundle that SSL contexts made by the import (on this thread)
    load left to a background thread; see the module docstring."""
    with _import_lock:
        if name in sys.modules:
            return importlib.import_module(name)  # waits for an import still running elsewhere
        importer = threading.get_ident()
        own_attribute = _STDLIB_CONTEXT.__dict__.get("set_default_verify_paths")
        load_now = _STDLIB_CONTEXT.set_default_verify_paths
        pending = _PendingLoad(load_now)

        def set_default_verify_paths(context: ssl.SSLContext) -> None:
            if not (threading.get_ident() == importer and type(context) is _STDLIB_CONTEXT
                    and pending.defer(context)):
                load_now(context)

        _STDLIB_CONTEXT.set_default_verify_paths = set_default_verify_paths
        try:
            return importlib.import_module(name)
        finally:
            if own_attribute is None:
                del _STDLIB_CONTEXT.set_default_verify_paths
            else:
                _STDLIB_CONTEXT.set_default_verify_paths = own_attribute
            if not pending.done:
                _pending.append(pending)
                try:
                    threading.Thread(target=pending.finish, name="infermill-ca-bundle", daemon=True).start()
                except RuntimeError:  # no thread to be had: load now
                    pending.finish()


def ca_bundle_pending() -> bool:
    """Whether some deferred CA bundle is still loading."""
    return not all(pending.done for pending in _pending)


def wait_for_ca_bundle() -> None:
    """Return once every deferred CA bundle is loaded (loading it here if nobody has yet)."""
    for pending in list(_pending):
        pending.finish()


if hasattr(os, "register_at_fork"):  # a child must not inherit a half-loaded store, nor wait on no thread
    os.register_at_fork(before=wait_for_ca_bundle)
