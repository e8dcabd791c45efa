"""A chat server for structured output: it refuses a request without ``response_format`` (400),
and answers with the reply its prompt chooses by the request's temperature.

The prompt (the last chat message) is a JSON object of replies: ``{"default": REPLY, "0.7":
REPLY, ...}``, the one under ``str(temperature)`` if the request has it, else ``default``; or
``{"sequence": [REPLY, ...]}``: the Nth request of that prompt gets the Nth reply (the last after). A
reply that starts with ``LENGTH:`` is the rest, with ``finish_reason: length``. Each request is
appended to ``--requests FILE`` as a JSON line ``{"temperature", "prompt", "response_format"}``.
"""

import json
import threading
from http.server import ThreadingHTTPServer

import _common

p = _common.parser(__doc__)
p.add_argument("--requests", required=True)
args = _common.parse(p)
lock = threading.Lock()
ASKED: dict[str, int] = {}  # requests per prompt


class Handler(_common._Handler):  # its GET /v1/models, its replies
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        prompt = body["messages"][-1]["content"]
        with lock, open(args.requests, "a") as f:
            entry = {
                "temperature": body.get("temperature"),
                "prompt": prompt,
                "response_format": body.get("response_format"),
            }
            f.write(json.dumps(entry) + "\n")
        if (body.get("response_format") or {}).get("type") != "json_schema":
            return self._json(400, {"error": {"message": "this server answers only with response_format json_schema"}})
        replies = json.loads(prompt)
        with lock:
            asked = ASKED[prompt] = ASKED.get(prompt, 0) + 1
        if "sequence" in replies:  # the Nth request of this prompt gets the Nth reply (the last one after)
            reply = replies["sequence"][min(asked, len(replies["sequence"])) - 1]
        else:
            reply = replies.get(str(body.get("temperature")), replies["default"])
        finish = "length" if reply.startswith("LENGTH:") else "stop"
        text = reply.removeprefix("LENGTH:")
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        self._json(200, {"id": "s", "object": "chat.completion", "model": "test", "choices": [choice], "usage": usage})


server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
server.daemon_threads = True
server.models = True  # type: ignore[attr-defined]
threading.Thread(target=server.serve_forever, daemon=True).start()
_common.say(_common.READY_LINE)
_common.wait_forever()
