"""Becomes ready, then prints a fatal line to stderr once ``--trigger FILE`` appears, and stays
alive (like an engine whose GPU failed under a still-running HTTP frontend).

    --fatal TEXT     the line (default: a CUDA out-of-memory error)
    --trigger FILE   print the line when FILE exists, deleting it: so a restarted run stays healthy
"""

import os

import _common

p = _common.parser(__doc__)
p.add_argument("--fatal", default="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
p.add_argument("--trigger", required=True)
args = _common.parse(p)
_common.record(args)
_common.serve(args.port)
_common.say(_common.READY_LINE)
while not os.path.exists(args.trigger):
    _common.time.sleep(0.02)
os.unlink(args.trigger)
_common.say("Traceback (most recent call last):", _common.sys.stderr)
_common.say(args.fatal, _common.sys.stderr)
_common.wait_forever()
