"""What the test servers share: argument parsing, a record file, and a tiny OpenAI-compatible API.

The API runs on the standard library's threaded HTTP server so a test server starts in a
few tens of milliseconds; it answers ``GET /v1/models`` and echoes the last chat message
(or the prompt) from ``POST /v1/chat/completions`` / ``POST /v1/completions``. It never
logs requests, so readiness can only be seen through HTTP unless a script prints a line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

READY_LINE = "INFO:     Application startup complete."


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--record", help="append one JSON line of facts about this process to this file")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args, _unknown = p.parse_known_args()  # flags meant for other servers are ignored
    return args


def record(args: argparse.Namespace, **facts) -> None:
    """Append {pid, port, argv, env mark, ...facts} to ``--record`` (a no-op without it)."""
    if not args.record:
        return
    facts = {
        "pid": os.getpid(),
        "port": args.port,
        "argv": list(sys.orig_argv),
        "mark": os.environ.get("INFERMILL_TEST_MARK"),
        **facts,
    }
    with open(args.record, "a", encoding="utf-8") as f:
        f.write(json.dumps(facts) + "\n")


def say(line: str, stream=None) -> None:
    print(line, file=stream or sys.stdout, flush=True)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/v1/models" and self.server.models:  # type: ignore[attr-defined]
            self._json(200, {"object": "list", "data": [{"id": "test", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/v1/chat/completions":
            text = body["messages"][-1]["content"]
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        elif self.path == "/v1/completions":
            choice = {"index": 0, "text": body.get("prompt", ""), "finish_reason": "stop"}
        else:
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        self._json(
            200,
            {
                "id": "t",
                "object": "chat.completion",
                "model": "test",
                "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "served_by": os.getpid(),
            },
        )

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # silent on purpose
        pass


def serve(port: int, models: bool = True) -> ThreadingHTTPServer:
    """Serve the API on 127.0.0.1:``port`` from a daemon thread (``models=False``: without
    ``GET /v1/models``, so that the readiness probe never succeeds)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.models = models  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_forever() -> None:
    while True:
        time.sleep(3600)
