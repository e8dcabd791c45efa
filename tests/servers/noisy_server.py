"""Floods its output before it becomes ready, then serves and prints the ready line.

--big-line-mb N    print one line of N MiB (ending in "<END>")
--invalid-utf8     write bytes that are not UTF-8
--flood-mb N       write N MiB to stderr and N MiB to stdout, in 100-byte lines
"""

import sys

import _common

p = _common.parser(__doc__)
p.add_argument("--big-line-mb", type=float, default=0)
p.add_argument("--invalid-utf8", action="store_true")
p.add_argument("--flood-mb", type=float, default=0)
args = _common.parse(p)
if args.flood_mb:
    line = b"x" * 99 + b"\n"
    for _ in range(int(args.flood_mb * (1 << 20) / len(line))):
        sys.stderr.buffer.write(b"E" + line[1:])
        sys.stdout.buffer.write(b"O" + line[1:])
    sys.stderr.buffer.flush()
    sys.stdout.buffer.flush()
    _common.say("flood done")
if args.big_line_mb:
    sys.stdout.write("BIG" + "y" * int(args.big_line_mb * (1 << 20)) + "<END>\n")
    sys.stdout.flush()
if args.invalid_utf8:
    sys.stdout.buffer.write(b"\xff\xfe bad\n")
    sys.stdout.buffer.flush()
_common.serve(args.port)
_common.say(_common.READY_LINE)
_common.wait_forever()
