"""A program that uses CustomServer the way a user's script would, for the Ctrl-C test.

    python ctrl_c_driver.py SERVER_SCRIPT RECORD_FILE

Starts SERVER_SCRIPT under CustomServer, prints "driver: ready" once it serves, and waits
forever inside ``async with``; the test then sends it SIGINT.
"""

import asyncio
import sys

from infermill.config import InferenceConfig
from infermill.servers.custom import CustomServer


async def main(script: str, record: str) -> None:
    config = InferenceConfig(
        server_type="custom",
        model_name_or_path="test",
        model_kwargs={"server_script": script, "record": record},
        server_ready_max_attempts=40,
        server_ready_delay_sec=0.25,
        server_start_max_retries=0,
        server_stop_grace_sec=1,
    )
    async with CustomServer(config) as server:
        await server.wait_until_ready()
        print("driver: ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    except KeyboardInterrupt:
        print("driver: interrupted", flush=True)
        raise SystemExit(130) from None
