"""Spawns ``ARGV`` with ManagedProcess and then misbehaves, for the tests of what happens
when infermill's own process goes away without stopping its child.

    python process_driver.py exit ARGV...   print the child's pid, wait for a line on stdin, then
                                            return without stop() (the atexit hook must kill the group)
    python process_driver.py hang ARGV...   print the child's pid, then wait to be SIGKILLed
                                            (the parent-death signal must kill the child)
    python process_driver.py fork ARGV...   as hang, after forking a process that sleeps (no exec:
                                            as multiprocessing's fork), whose pid it prints
"""

import asyncio
import os
import sys
import time

from infermill.servers.process import ManagedProcess


async def main(mode: str, argv: list[str]) -> None:
    seen = asyncio.Event()
    process = await ManagedProcess.spawn(argv, on_line=lambda line: seen.set())
    await asyncio.wait_for(seen.wait(), 10)  # the child is up and has printed something
    print(f"child {process.pid}", flush=True)
    if mode == "fork":
        forked = os.fork()
        if forked == 0:
            for fd in (0, 1, 2):  # not the test's pipes: it waits for them to close
                os.dup2(os.open(os.devnull, os.O_RDWR), fd)
            time.sleep(600)  # noqa: ASYNC251 (the forked child: no event loop runs in it)
            os._exit(0)
        print(f"forked {forked}", flush=True)
    if mode in ("hang", "fork"):
        await asyncio.Event().wait()
    sys.stdin.readline()  # the test has looked at the processes: go


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
