"""The readiness handshake every long-running command uses (DHT node, peer).

Once ready, a process prints exactly one line ``SWARMLLM_READY {json}`` (role, peer id, multiaddrs, …)
and, if asked, writes its multiaddrs one per line to a file, atomically. Scripts and tests wait for
that line instead of guessing ports or sleeping.
"""

from __future__ import annotations

import json
import os

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
