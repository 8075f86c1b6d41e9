"""`swarmllm health --initial-peers ... [--host] [--port]`: serve the swarm health page."""

from __future__ import annotations

import argparse
import asyncio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    parser.add_argument("--refresh-period", type=float, default=10.0, help="seconds between snapshots")


def main(args: argparse.Namespace) -> None:

    from dht import directory
    from dht.ready import serve_http
    from health.app import make_app
    from health.monitor import Monitor

    node = directory.start_node(None, args.initial_peers, client_mode=True)

    async def serve() -> None:
        monitor = Monitor(node, period=args.refresh_period)
        await monitor.start()
        async with asyncio.TaskGroup() as tasks:
            refresher = tasks.create_task(monitor.run())
            await serve_http(make_app(monitor), args.host, args.port, "health")
            refresher.cancel()

    try:
        asyncio.run(serve())
    finally:
        node.shutdown()
