"""The readiness handshake every long-running command uses (DHT node, peer).

Once ready, a process prints exactly one line ``SWARMLLM_READY {json}`` (role, peer id, multiaddrs, …)
and, if asked, writes its multiaddrs one per line to a file, atomically. Scripts and tests wait for
that line instead of guessing ports or sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

READY_PREFIX = "SWARMLLM_READY"


def ready_line(role: str, **fields) -> str:
    return f"{READY_PREFIX} " + json.dumps({"role": role, **fields})


def parse_ready_line(line: str) -> dict | None:
    """The JSON of a readiness line, or None for any other line."""
    if not line.startswith(READY_PREFIX + " "):
        return None
    return json.loads(line[len(READY_PREFIX) + 1:])


def write_maddr_file(path: str | None, maddrs: list[str]) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(maddrs) + "\n")
        os.replace(tmp, path)


async def serve_http(app, host: str, port: int, role: str, path: str = "/", **fields) -> None:
    """Serve an ASGI app with uvicorn until SIGTERM or SIGINT; once it listens, print the ready line with
    its URL (``path`` appended) and ``fields``. ``port`` 0 picks a free port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # handled here, as a graceful stop
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(server.serve())
        while not server.started:
            if serving.done():
                return
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1]
        print(ready_line(role, url=f"http://{host}:{bound}{path}", maddrs=[], **fields), flush=True)
