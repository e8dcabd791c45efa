"""Prints ``--say`` lines, optionally serves the API, then exits with ``--exit`` or stays alive.

--say TEXT | --say='["line 1", "line 2"]'   lines to print (a JSON list for several)
--stderr                                     print them to stderr instead of stdout
--serve                                      serve the API (before printing)
--serve-after SECONDS                        serve it this long after printing instead
--no-models                                  serve it without GET /v1/models (HTTP 404)
--exit CODE                                  exit with CODE after printing
"""

import json

import _common

p = _common.parser(__doc__)
p.add_argument("--say", default=None)
p.add_argument("--stderr", action="store_true")
p.add_argument("--serve", action="store_true")
p.add_argument("--serve-after", type=float, default=None)
p.add_argument("--no-models", action="store_true")
p.add_argument("--exit", type=int, default=None)
args = _common.parse(p)
_common.record(args)
if args.serve:
    _common.serve(args.port, models=not args.no_models)
lines = [] if args.say is None else json.loads(args.say) if args.say.startswith("[") else [args.say]
for line in lines:
    _common.say(line, _common.sys.stderr if args.stderr else None)
if args.serve_after is not None:
    _common.time.sleep(args.serve_after)
    _common.serve(args.port, models=not args.no_models)
if args.exit is not None:
    raise SystemExit(args.exit)
_common.wait_forever()
