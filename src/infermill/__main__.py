"""``python -m infermill``: the ``infermill`` command in a process of its own (a ``--workers``
parent starts each of its workers so)."""

import gc

from infermill.cli import main

try:
    main()
finally:
    # The command is done and its process ends: on the way out, Python's garbage collector would
    # look through every object of its ~450 modules for cycles, more than once (~60 ms of CPU per
    # process, as much as its slowest import); frozen, they are left out of those passes (what a
    # cycle holds goes back to the system with the process, as all its memory does).
    gc.freeze()
