#!/usr/bin/env python
"""An OpenAI-compatible test server that misbehaves on demand.

    python tests/servers/faulty_server.py --port 8000 [--stats-file PATH] [--directives "..."]

The server is the echo app (:func:`infermill.echo_app.build_echo_app`: ``/v1/models``,
``/health`` and the completions, whose normal replies it gives) with a middleware that counts
each completion request and applies its faults, plus ``GET /stats`` and ``POST /control``.
What goes wrong is chosen per request by *directives*: whitespace-separated words in the
request's text (the last chat message, or the completions prompt), plus the server-wide
default directives (``--directives``, or ``POST /control``). Words that are not
directives are ordinary text.

Directives. ``N`` means "only the first N requests carrying this exact word" (counted
per word, so ``fail500:2:docA`` and ``fail500:2:docB`` count separately; ``KEY`` is any
label that makes a word unique). Without ``N`` the directive applies every time.

    tag:KEY                     nothing; the request is counted and timed under its word
    sleep:SECS[:N[:KEY]]        wait SECS before answering (then apply the rest)
    hang[:N[:KEY]]              never answer (until the client goes away)
    drop[:N[:KEY]]              close the connection without a reply
    truncated[:N[:KEY]]         start a 200 reply, send part of the body, close the connection
    fail<CODE>[:N[:KEY]]        answer HTTP CODE with a JSON error body (``bad<CODE>`` is the same)
    rate<CODE>:N:SECS[:KEY]     answer HTTP CODE (e.g. 429) with ``Retry-After: SECS``
    malformed[:N[:KEY]]         answer 200 with a truncated JSON body (complete Content-Length)
    empty[:N[:KEY]]             answer 200 with a JSON object that has no choices
    kill[:N[:KEY]]              exit the process at once (code 17), without answering
    fatal[:N[:KEY]]             print the fatal line (``--fatal-line``) to stderr, then never answer:
                                an engine that failed under a still-running HTTP frontend
    reasoning:TEXT              add ``reasoning: TEXT`` to the chat message
    reasoning_content:TEXT      add ``reasoning_content: TEXT`` to the chat message
    echo_request                the reply's text is the request (``{"path", "body"}``) as JSON

Order: kill, fatal, sleep, hang, drop, truncated, fail/rate, malformed/empty, then a normal reply.

Server-wide flags (unknown flags are accepted and ignored, so any ``model_kwargs`` fit):

    --directives STR     default directives applied to every request
    --kill-after N       exit (code 17) when request N+1 arrives: N requests are served
    --hang-after N       every request after the first N hangs
    --fail-after N       every request after the first N gets HTTP 500 (a storm that does not end)
    --startup-delay S    print "faulty_server: listening in S s", then wait S seconds before listening
    --fatal-line TEXT    the line the ``fatal`` directive prints (default: a CUDA out-of-memory error)
    --last-words TEXT    a line printed to stderr just before the process exits on purpose (``kill``,
                         ``--kill-after``), so its "last lines" can be checked in error messages
    --ignore-sigterm     ignore SIGTERM and SIGINT (printing "faulty_server: ignoring SIGTERM" or "... SIGINT"):
                         only SIGKILL stops the server
    --grandchild         spawn tests/servers/sleeper.py --ignore-sigterm in the server's process group
                         (its pid is ``grandchild`` in the stats): a worker that outlives its server
    --daemon-grandchild  as --grandchild, but in a session of its own (``setsid``), as a daemon does:
                         it leaves the server's process group
    --capacity B         serve at most B completions at once, each for --service-time S seconds; the
                         others wait in arrival order: a GPU with a knee (throughput stops growing at
                         B requests in flight, latency goes on growing)
    --service-time S     see --capacity (default 0.05)
    --rate-limit Q       answer HTTP 429 to the completions beyond Q in each second of
                         ``time.monotonic()``, with ``Retry-After`` the (fractional) seconds until the
                         next second: an API's quota
    --echo-auth          error replies quote the request's ``Authorization`` header (as some proxies
                         do), to check that clients keep API keys out of their error messages
    --stats-file PATH    keep the stats in PATH (written atomically soon after every change and on
                         SIGTERM/SIGINT); if PATH exists at start, its counters carry on, so
                         "first N" directives and ``--kill-after``/``--hang-after``/``--fail-after``
                         span restarts; without it each process counts from 0. ``{replica}`` in
                         PATH is replaced by ``$INFERMILL_REPLICA`` (a replica pool's index, else 0)

Endpoints: the echo app's (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health``), ``GET /stats`` (the stats as JSON), and ``POST /control`` with any of
``{"directives": str, "kill_after": int|null, "hang_after": int|null, "fail_after": int|null,
"reset": bool}``.

Stats: ``requests`` (completion requests received), ``in_flight``, ``max_in_flight``,
``connections`` (distinct client connections), ``by_word`` (requests per directive word),
``by_outcome`` (``"200"``, ``"500"``, ``"drop"``, ``"hang"``, ...), ``by_path``,
``arrivals`` (per directive word, the ``time.time()`` of each arrival, first 1000),
``starts`` (process starts sharing this stats file), ``pid``, ``port``, ``grandchild`` (its pid or
null), ``authorization`` (how often each ``Authorization`` header value was received).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

from infermill.echo_app import build_echo_app, json_response, message_text

KILL_EXIT_CODE = 17
MAX_ARRIVALS = 1000
FLUSH_INTERVAL = 0.05
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")

_WORD = re.compile(
    r"^(?:tag:\S+|sleep:[0-9.]+(?::\d+(?::\S+)?)?|(?:hang|drop|truncated|malformed|empty|kill|fatal)(?::\d+(?::\S+)?)?"
    r"|(?:fail|bad)\d{3}(?::\d+(?::\S+)?)?|rate\d{3}:\d+:[0-9.]+(?::\S+)?|reasoning(?:_content)?:\S+|echo_request)$"
)


class Directive:
    __slots__ = ("arg", "code", "first_n", "name", "seconds", "word")

    def __init__(self, word: str):
        self.word = word
        parts = word.split(":")
        name = parts[0]
        self.code: int | None = None
        self.first_n: int | None = None
        self.seconds: float | None = None
        self.arg: str | None = None
        if m := re.fullmatch(r"(fail|bad|rate)(\d{3})", name):
            name, self.code = ("rate" if m.group(1) == "rate" else "fail"), int(m.group(2))
        if name == "rate":
            self.first_n, self.seconds = int(parts[1]), float(parts[2])
        elif name == "sleep":
            self.seconds = float(parts[1])
            self.first_n = int(parts[2]) if len(parts) > 2 else None
        elif name in ("tag", "reasoning", "reasoning_content"):
            self.arg = word.split(":", 1)[1]
        elif len(parts) > 1:
            self.first_n = int(parts[1])
        self.name = name


def parse_directives(text: str) -> list[Directive]:
    return [Directive(word) for word in text.split() if _WORD.match(word)]


class FaultyServer:
    def __init__(self, args: argparse.Namespace):
        self.model = args.model
        self.port = args.port
        self.default_directives = args.directives or ""
        self.kill_after: int | None = args.kill_after
        self.hang_after: int | None = args.hang_after
        self.fail_after: int | None = args.fail_after
        replica = os.environ.get("INFERMILL_REPLICA", "0")
        self.stats_file: str | None = args.stats_file.replace("{replica}", replica) if args.stats_file else None
        self.fatal_line: str = args.fatal_line
        self.last_words: str | None = args.last_words
        self.echo_auth: bool = args.echo_auth
        self.capacity = asyncio.Semaphore(args.capacity) if args.capacity else None
        self.service_time: float = args.service_time
        self.rate_limit: int | None = args.rate_limit
        self.rate_second, self.rate_used = 0, 0
        self.grandchild: int | None = None
        self.authorization: Counter[str] = Counter()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.previous_connections = 0
        self.peers: set[Any] = set()
        self.by_word: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.by_path: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = {}
        self.starts = 1
        self._dirty = False
        self._load()

    # -- stats --------------------------------------------------------------------------

    def _load(self) -> None:
        if not self.stats_file or not os.path.exists(self.stats_file):
            return
        with open(self.stats_file, "rb") as f:
            old = orjson.loads(f.read())
        self.starts = old.get("starts", 0) + 1
        self.requests = old.get("requests", 0)
        self.max_in_flight = old.get("max_in_flight", 0)
        self.previous_connections = old.get("connections", 0)
        self.by_word.update(old.get("by_word", {}))
        self.by_outcome.update(old.get("by_outcome", {}))
        self.by_path.update(old.get("by_path", {}))
        self.arrivals = {k: list(v) for k, v in old.get("arrivals", {}).items()}
        self.authorization.update(old.get("authorization", {}))

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "port": self.port,
            "starts": self.starts,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "connections": self.previous_connections + len(self.peers),
            "by_word": dict(self.by_word),
            "by_outcome": dict(self.by_outcome),
            "by_path": dict(self.by_path),
            "arrivals": self.arrivals,
            "default_directives": self.default_directives,
            "grandchild": self.grandchild,
            "authorization": dict(self.authorization),
        }

    def flush(self) -> None:
        if not self.stats_file:
            return
        self._dirty = False
        folder = os.path.dirname(os.path.abspath(self.stats_file))
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".stats-")
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(self.stats()))
        os.replace(temp, self.stats_file)

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if self._dirty:
                self.flush()

    def die(self) -> None:
        self.flush()
        if self.last_words:
            print(self.last_words, file=sys.stderr, flush=True)
        print(f"faulty_server: killed on purpose after {self.requests} requests", flush=True)
        os._exit(KILL_EXIT_CODE)

    # -- requests -----------------------------------------------------------------------

    def _applies(self, directive: Directive) -> bool:
        return directive.first_n is None or self.by_word[directive.word] <= directive.first_n

    @web.middleware
    async def faults(self, request: web.Request, handler) -> web.StreamResponse:
        """Counts every completion request and applies its directives around the echo app's handler."""
        if request.method != "POST" or request.path not in COMPLETION_PATHS:
            return await handler(request)
        chat = request.path.endswith("/chat/completions")
        raw = await request.read()  # kept by aiohttp: the echo app's handler reads it again
        self.requests += 1
        number = self.requests
        self.by_path[request.path] += 1
        if "Authorization" in request.headers:
            self.authorization[request.headers["Authorization"]] += 1
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._dirty = True
        outcome = "error"
        try:
            if self.kill_after is not None and number > self.kill_after:
                self.die()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
            messages = body.get("messages") if isinstance(body, dict) else None
            if not isinstance(body, dict) or (chat and not isinstance(messages, list)):
                response = await handler(request)  # the echo app's HTTP 400
                outcome = str(response.status)
                return response
            if chat:
                last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
                text = message_text(last.get("content"))
            else:
                text = str(body.get("prompt", ""))
            directives = parse_directives(self.default_directives + " " + text)
            now = time.time()
            for d in directives:
                self.by_word[d.word] += 1
                times = self.arrivals.setdefault(d.word, [])
                if len(times) < MAX_ARRIVALS:
                    times.append(now)
            active = [d for d in directives if self._applies(d)]
            names = {d.name: d for d in active}

            if "kill" in names:
                self.die()
            if "fatal" in names:
                outcome = "fatal"
                print("Traceback (most recent call last):", file=sys.stderr, flush=True)
                print(self.fatal_line, file=sys.stderr, flush=True)
                await asyncio.Event().wait()
            for d in active:
                if d.name == "sleep":
                    await asyncio.sleep(d.seconds or 0.0)
            if "hang" in names or (self.hang_after is not None and number > self.hang_after):
                outcome = "hang"
                await asyncio.Event().wait()
            if "drop" in names:
                outcome = "drop"
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError  # nothing more to send on a closed connection
            if "truncated" in names:
                outcome = "truncated"
                response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                response.content_length = 1000
                await response.prepare(request)
                await response.write(b'{"id": "cut", "choices": [{"index": 0, ')
                await asyncio.sleep(0.01)
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError
            for d in active:
                if d.name == "rate":
                    outcome = str(d.code)
                    error = {"error": {"message": f"rate limited ({d.word})", "type": "RateLimitError"}}
                    response = json_response(self._quote_auth(error, request), d.code or 429)
                    response.headers["Retry-After"] = f"{d.seconds:g}"
                    return response
                if d.name == "fail":
                    outcome = str(d.code)
                    error = {"error": {"message": f"injected failure ({d.word})", "type": "Error"}}
                    return json_response(self._quote_auth(error, request), d.code or 500)
            if self.fail_after is not None and number > self.fail_after:
                outcome = "500"
                error = {"error": {"message": f"injected failure (request {number} > --fail-after)", "type": "Error"}}
                return json_response(self._quote_auth(error, request), 500)
            if "malformed" in names:
                outcome = "malformed"
                return web.Response(
                    body=b'{"id": "malformed", "choices": [{"index": 0, "mess',
                    status=200,
                    content_type="application/json",
                )
            if "empty" in names:
                outcome = "empty"
                return json_response({"id": "empty", "object": "chat.completion", "choices": []})

            if self.rate_limit is not None and (wait := self._rate_wait()):
                outcome = "429"
                error = {"error": {"message": "rate limit exceeded", "type": "RateLimitError"}}
                response = json_response(error, 429)
                response.headers["Retry-After"] = f"{wait:.3f}"
                return response
            if self.capacity is not None:
                async with self.capacity:  # FIFO: the others wait their turn
                    await asyncio.sleep(self.service_time)
            response = await handler(request)  # the echo app's reply
            outcome = str(response.status)
            if not {"echo_request", "reasoning", "reasoning_content"} & names.keys():
                return response
            reply = orjson.loads(response.body)
            if "echo_request" in names:
                echoed = orjson.dumps({"path": request.path, "body": body}).decode()
                if chat:
                    reply["choices"][0]["message"]["content"] = echoed
                else:
                    reply["choices"][0]["text"] = echoed
            if chat:
                for field in ("reasoning", "reasoning_content"):
                    if field in names:
                        reply["choices"][0]["message"][field] = names[field].arg
            return json_response(reply, response.status)
        except asyncio.CancelledError:
            if outcome == "error":
                outcome = "cancelled"
            raise
        finally:
            self.in_flight -= 1
            self.by_outcome[outcome] += 1
            self._dirty = True

    def _rate_wait(self) -> float:
        """0.0 if this second's quota has room (taking one), else the seconds until the next second."""
        now = time.monotonic()
        if int(now) != self.rate_second:
            self.rate_second, self.rate_used = int(now), 0
        assert self.rate_limit is not None
        if self.rate_used < self.rate_limit:
            self.rate_used += 1
            return 0.0
        return self.rate_second + 1 - now

    def _quote_auth(self, error: dict[str, Any], request: web.Request) -> dict[str, Any]:
        if self.echo_auth:
            error["error"]["message"] += f" (request had Authorization: {request.headers.get('Authorization')})"
        return error

    async def handle_stats(self, _: web.Request) -> web.Response:
        return json_response(self.stats())

    async def handle_control(self, request: web.Request) -> web.Response:
        change = orjson.loads(await request.read() or b"{}")
        if change.get("reset"):
            self.requests = self.max_in_flight = self.previous_connections = 0
            self.peers.clear()
            self.by_word.clear()
            self.by_outcome.clear()
            self.by_path.clear()
            self.arrivals.clear()
        if "directives" in change:
            self.default_directives = change["directives"] or ""
        if "kill_after" in change:
            self.kill_after = change["kill_after"]
        if "hang_after" in change:
            self.hang_after = change["hang_after"]
        if "fail_after" in change:
            self.fail_after = change["fail_after"]
        self._dirty = True
        return json_response(self.stats())

    def build_app(self) -> web.Application:
        """The echo app (``/v1/models``, ``/health``, the completions), its completions wrapped in
        ``faults``, plus ``/stats`` and ``/control``."""
        app = build_echo_app(self.model)
        app.middlewares.append(self.faults)
        app.router.add_get("/stats", self.handle_stats)
        app.router.add_post("/control", self.handle_control)
        return app


SLEEPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sleeper.py")


def say_ignored(sig: signal.Signals) -> None:
    print(f"faulty_server: ignoring {sig.name}", flush=True)


async def serve(args: argparse.Namespace) -> None:
    server = FaultyServer(args)
    if args.grandchild or args.daemon_grandchild:
        # before the server listens: nothing else runs on the loop yet
        server.grandchild = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, SLEEPER, "--ignore-sigterm"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=args.daemon_grandchild,
        ).pid
    if args.startup_delay:
        print(f"faulty_server: listening in {args.startup_delay:g} s", flush=True)
        await asyncio.sleep(args.startup_delay)
    runner = web.AppRunner(server.build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, backlog=1024).start()
    server.flush()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if args.ignore_sigterm:
            loop.add_signal_handler(sig, say_ignored, sig)  # ignored, but seen: a test can wait for the line
        else:
            loop.add_signal_handler(sig, stop.set)
    flusher = asyncio.create_task(server.flush_periodically())
    print(f"Faulty server listening on http://{args.host}:{args.port}", flush=True)
    print("Application startup complete.", flush=True)
    await stop.wait()
    flusher.cancel()
    server.flush()
    os._exit(0)  # do not wait for hanging handlers


def _from_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="faulty")
    # (the faults may also come from the environment, which a test changes to lift them: tests/faultjob.py)
    parser.add_argument("--directives", default=os.environ.get("FAULTY_DIRECTIVES", ""))
    parser.add_argument("--kill-after", type=int, default=_from_env("FAULTY_KILL_AFTER"))
    parser.add_argument("--hang-after", type=int, default=_from_env("FAULTY_HANG_AFTER"))
    parser.add_argument("--fail-after", type=int, default=_from_env("FAULTY_FAIL_AFTER"))
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--stats-file", default=None)
    parser.add_argument(
        "--fatal-line", default="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    parser.add_argument("--last-words", default=None)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--daemon-grandchild", action="store_true")
    parser.add_argument("--echo-auth", action="store_true")
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--service-time", type=float, default=0.05)
    parser.add_argument("--rate-limit", type=int, default=None)
    args, unknown = parser.parse_known_args()
    if unknown:
        print(f"faulty_server: ignoring flags {unknown}", file=sys.stderr, flush=True)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
