"""infermill.ca_bundle: an import whose SSL contexts load the CA bundle in the background, and
a TLS handshake that waits for it (real certificates from trustme, real TLS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import ssl
import subprocess
import sys
import textwrap

import pytest
import trustme
from aiohttp import web

from infermill.ca_bundle import ca_bundle_pending, import_loading_ca_in_background, wait_for_ca_bundle

SLOW_BUNDLE_COPIES = 3000  # the test CA this many times over: about a second to load


@pytest.fixture
def ca():
    return trustme.CA()


def write_bundle(path, ca: trustme.CA, copies: int = 1) -> str:
    path.write_bytes(ca.cert_pem.bytes() * copies)
    return str(path)


def test_contexts_the_import_makes_get_their_certificates_in_the_background(tmp_path, ca, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", write_bundle(tmp_path / "ca.pem", ca))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "makes_contexts.py").write_text(textwrap.dedent("""
        import ssl, threading
        own = ssl.create_default_context()
        own_at_import = own.cert_store_stats()["x509_ca"]
        others = []
        thread = threading.Thread(target=lambda: others.append(ssl.create_default_context()))
        thread.start()
        thread.join()
        other_at_import = others[0].cert_store_stats()["x509_ca"]
    """))
    module = import_loading_ca_in_background("makes_contexts")
    assert module.own_at_import == 0  # deferred
    assert module.other_at_import == 1  # another thread's context loads as usual, at once
    assert "set_default_verify_paths" not in vars(ssl.SSLContext)  # the patch is gone
    wait_for_ca_bundle()
    assert not ca_bundle_pending()
    assert module.own.cert_store_stats()["x509_ca"] == 1
    assert type(module.own) is ssl.SSLContext
    assert import_loading_ca_in_background("makes_contexts") is module  # imported once


def test_a_failing_import_still_removes_the_patch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "breaks_on_import.py").write_text("import ssl\nssl.create_default_context()\nraise RuntimeError('no')\n")
    with pytest.raises(RuntimeError, match="no"):
        import_loading_ca_in_background("breaks_on_import")
    assert "set_default_verify_paths" not in vars(ssl.SSLContext)
    wait_for_ca_bundle()
    assert not ca_bundle_pending()


def test_a_subclass_context_loads_at_once_even_with_a_read_only_class(tmp_path, ca, monkeypatch):
    # truststore's SSLContext, injected into ssl, is such a subclass
    monkeypatch.setenv("SSL_CERT_FILE", write_bundle(tmp_path / "ca.pem", ca))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "makes_a_subclass_context.py").write_text(textwrap.dedent("""
        import ssl
        class Sealed(ssl.SSLContext):
            __class__ = property(lambda self: Sealed)
        class Plain(ssl.SSLContext):
            pass
        sealed, plain = Sealed(ssl.PROTOCOL_TLS_CLIENT), Plain(ssl.PROTOCOL_TLS_CLIENT)
        sealed.set_default_verify_paths()
        plain.set_default_verify_paths()
        at_import = [sealed.cert_store_stats()["x509_ca"], plain.cert_store_stats()["x509_ca"]]
    """))
    module = import_loading_ca_in_background("makes_a_subclass_context")
    assert module.at_import == [1, 1]
    assert type(module.plain).__name__ == "Plain"


def test_tls_on_a_deferred_context_during_the_import_loads_it_there(tmp_path, ca, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", write_bundle(tmp_path / "ca.pem", ca))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "uses_its_context.py").write_text(textwrap.dedent("""
        import ssl
        context = ssl.create_default_context()
        context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="example.org")
        at_import = context.cert_store_stats()["x509_ca"]
    """))
    module = import_loading_ca_in_background("uses_its_context")  # no deadlock
    assert module.at_import == 1


FORKS = textwrap.dedent("""
    import os, sys
    from infermill.ca_bundle import ca_bundle_pending, import_loading_ca_in_background

    module = import_loading_ca_in_background("makes_contexts")
    assert ca_bundle_pending()
    pid = os.fork()
    if pid == 0:  # the child has the certificates, and no thread to wait for
        os._exit(0 if module.own.cert_store_stats()["x509_ca"] == 1 else 3)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_fork_during_the_load_gives_the_child_loaded_contexts(tmp_path, ca):
    (tmp_path / "makes_contexts.py").write_text("import ssl\nown = ssl.create_default_context()\n")
    env = {**os.environ, "SSL_CERT_FILE": write_bundle(tmp_path / "slow.pem", ca, SLOW_BUNDLE_COPIES),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FORKS], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    from infermill.ca_bundle import ca_bundle_pending, import_loading_ca_in_background

    aiohttp = import_loading_ca_in_background("aiohttp")
    loading = ca_bundle_pending()

    async def main():
        async with aiohttp.ClientSession() as session:  # aiohttp's default, verifying context
            try:
                async with session.get(sys.argv[1]) as response:
                    return {"status": response.status, "body": await response.text()}
            except aiohttp.ClientConnectorCertificateError as e:
                return {"error": "certificate", "detail": str(e)}

    if sys.argv[2] == "uvloop":  # what infermill runs on when it is installed
        import uvloop
        result = uvloop.run(main())
    else:
        result = asyncio.run(main())
    print(json.dumps({"loading_when_sent": loading, **result}))
""")


async def https_server(ca: trustme.CA):
    app = web.Application()
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="over TLS")

    app.router.add_get("/", hello)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"https://127.0.0.1:{port}/"


async def run_client(url: str, bundle: str, loop: str) -> dict:
    env = {**os.environ, "SSL_CERT_FILE": bundle}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, url, loop, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return json.loads(out)


LOOPS = pytest.mark.parametrize("loop", ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"))])


@LOOPS
async def test_a_tls_handshake_while_the_bundle_loads_waits_for_it(tmp_path, ca, loop):
    runner, url = await https_server(ca)
    try:
        result = await run_client(url, write_bundle(tmp_path / "slow.pem", ca, SLOW_BUNDLE_COPIES), loop)
    finally:
        await runner.cleanup()
    assert result["loading_when_sent"], "the request went out after the bundle had loaded: nothing was tested"
    assert result.get("status") == 200, result
    assert result["body"] == "over TLS"


@LOOPS
async def test_certificates_are_still_verified(tmp_path, ca, loop):
    runner, url = await https_server(ca)
    try:
        result = await run_client(url, write_bundle(tmp_path / "other.pem", trustme.CA(), SLOW_BUNDLE_COPIES), loop)
    finally:
        await runner.cleanup()
    assert result["loading_when_sent"]
    assert result.get("error") == "certificate", result


async def test_infermill_run_against_an_https_endpoint_while_the_bundle_loads(tmp_path, ca):
    # the whole path: `infermill run` imports aiohttp with the bundle deferred, the endpoint's
    # probe and requests go over TLS, verified against a bundle that takes about a second to load
    from infermill.echo_app import build_echo_app

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    runner = web.AppRunner(build_echo_app("echo"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "text": f"doc {i}"}) + "\n" for i in range(5)))
    job = {"input": {"path": str(tmp_path / "in.jsonl")}, "output": {"path": str(tmp_path / "out")},
           "rollout": {"template": "Echo: [[DOCUMENT]]"},
           "inference": {"server_type": "endpoint", "endpoint_url": f"https://127.0.0.1:{port}/v1",
                         "model_name_or_path": "echo", "api_key": "k",
                         # one probe, no second start: a handshake before the load would fail the run
                         "server_ready_max_attempts": 1, "server_ready_delay_sec": 0.05,
                         "server_start_max_retries": 0}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    env = {**os.environ, "SSL_CERT_FILE": write_bundle(tmp_path / "slow.pem", ca, SLOW_BUNDLE_COPIES)}
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "infermill", "run", str(tmp_path / "job.yaml"), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 90)
    finally:
        await runner.cleanup()
    assert process.returncode == 0, err.decode()[-3000:]
    records = [json.loads(line) for path in (tmp_path / "out").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [str(i) for i in range(5)]
    assert all(r["metadata"]["rollout_results"][0]["text"].startswith("Echo: doc") for r in records), records[0]
