"""Spawns a grandchild (sleeper.py), records both pids, then serves and prints the ready line.

--ignore-sigterm     ignore SIGTERM (the grandchild inherits SIG_IGN, so it ignores it too)
--stubborn-grandchild  only the grandchild ignores SIGTERM
--ready-after SECS   wait this long before serving (0: at once; <0: never)
--daemon             the grandchild leaves the process group (setsid), as a daemon does
"""

import signal
import subprocess
import sys
from pathlib import Path

import _common

p = _common.parser(__doc__)
p.add_argument("--ignore-sigterm", action="store_true")
p.add_argument("--stubborn-grandchild", action="store_true")
p.add_argument("--ready-after", type=float, default=0.0)
p.add_argument("--daemon", action="store_true")
args = _common.parse(p)
if args.ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
sleeper = [sys.executable, str(Path(__file__).with_name("sleeper.py"))]
grandchild = subprocess.Popen(
    sleeper + (["--ignore-sigterm"] if args.stubborn_grandchild else []), start_new_session=args.daemon
)
_common.record(args, grandchild=grandchild.pid)
_common.say(f"spawned worker {grandchild.pid}")
if args.ready_after >= 0:
    _common.time.sleep(args.ready_after)
    _common.serve(args.port)
    _common.say(_common.READY_LINE)
_common.wait_forever()
