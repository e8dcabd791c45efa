"""Import a module without waiting for the CA bundle its import loads.

aiohttp builds its two default SSL contexts when it is imported, and each reads and parses
the system CA bundle: with OpenSSL 3 that takes 40-100 ms apiece, a third of aiohttp's import
and the largest single piece of ``infermill run``'s start-up, for contexts that a run against
its own local server never uses. :func:`import_loading_ca_in_background` defers that loading
to a thread, where it runs beside the rest of start-up (OpenSSL releases the GIL while it
reads). Until it is done, those contexts make every TLS handshake wait for it, so no
connection ever sees a context without its certificates.
"""

from __future__ import annotations

import importlib
import logging
import ssl
import sys
import threading
from types import ModuleType
from typing import Any

logger = logging.getLogger("infermill")

_import_lock = threading.Lock()
_loads: list[threading.Event] = []  # one per import that deferred some loading


class _CertificatesLoading(ssl.SSLContext):
    """A context whose CA certificates are loading in the background: TLS waits for them.
    Each import gets a subclass with its own ``loaded`` event."""

    loaded: threading.Event

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.loaded.wait()  # meanwhile, the loader gives the context its own class back
        return ssl.SSLContext.wrap_socket(self, *args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:  # asyncio's and uvloop's TLS
        self.loaded.wait()
        return ssl.SSLContext.wrap_bio(self, *args, **kwargs)


def import_loading_ca_in_background(name: str) -> ModuleType:
    """``import name``, with the CA bundle that SSL contexts made by the import (on this thread)
    load left to a background thread; see the module docstring."""
    with _import_lock:
        if name in sys.modules:
            return sys.modules[name]
        importer = threading.get_ident()
        loaded = threading.Event()
        loading_class = type("CertificatesLoading", (_CertificatesLoading,), {"loaded": loaded})
        deferred: list[tuple[ssl.SSLContext, type]] = []
        own_attribute = ssl.SSLContext.__dict__.get("set_default_verify_paths")
        load_now = ssl.SSLContext.set_default_verify_paths

        def set_default_verify_paths(context: ssl.SSLContext) -> None:
            if threading.get_ident() == importer:
                cls = type(context)
                try:
                    context.__class__ = loading_class
                except TypeError:  # a subclass with its own layout: load it now
                    pass
                else:
                    deferred.append((context, cls))
                    return
            load_now(context)

        ssl.SSLContext.set_default_verify_paths = set_default_verify_paths  # type: ignore[method-assign]
        try:
            return importlib.import_module(name)
        finally:
            if own_attribute is None:
                del ssl.SSLContext.set_default_verify_paths
            else:
                ssl.SSLContext.set_default_verify_paths = own_attribute  # type: ignore[method-assign]
            if deferred:
                _loads.append(loaded)
                threading.Thread(target=_load, args=(deferred, load_now, loaded), name="infermill-ca-bundle",
                                 daemon=True).start()
            else:
                loaded.set()


def wait_for_ca_bundle(timeout: float | None = None) -> bool:
    """Wait until every deferred CA bundle is loaded; whether they are."""
    return all(event.wait(timeout) for event in list(_loads))


def _load(deferred: list[tuple[ssl.SSLContext, type]], load: Any, loaded: threading.Event) -> None:
    try:
        for context, cls in deferred:
            try:
                load(context)
            except Exception as e:  # at import time, this would have failed the import
                logger.warning("could not load the system CA certificates: %s", e)
            context.__class__ = cls
    finally:
        loaded.set()
