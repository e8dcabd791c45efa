"""A grandchild: sleeps until killed (it lives in tests/servers so `no_orphans` sees it too).

--ignore-sigterm   ignore SIGTERM, so only SIGKILL ends it
"""

import signal
import sys
import time

if "--ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(3600)
