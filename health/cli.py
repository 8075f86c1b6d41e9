"""`swarmllm health --initial-peers ... [--host] [--port]`: serve the swarm health page."""

from __future__ import annotations

import argparse
import asyncio
import signal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    parser.add_argument("--refresh-period", type=float, default=10.0, help="seconds between snapshots")


def main(args: argparse.Namespace) -> None:
    import uvicorn

    from dht import directory
    from dht.ready import ready_line
    from health.app import make_app
    from health.monitor import Monitor

    node = directory.start_node(None, args.initial_peers, client_mode=True)

    async def serve() -> None:
        monitor = Monitor(node, period=args.refresh_period)
        await monitor.start()
        server = uvicorn.Server(uvicorn.Config(make_app(monitor), host=args.host, port=args.port, log_level="warning"))
        server.install_signal_handlers = lambda: None  # we handle SIGTERM ourselves, below
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        async with asyncio.TaskGroup() as tasks:
            serving = tasks.create_task(server.serve())
            refresher = tasks.create_task(monitor.run())
            while not server.started:
                if serving.done():
                    return
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            print(ready_line("health", url=f"http://{args.host}:{port}/", maddrs=[]), flush=True)
            await serving
            refresher.cancel()

    try:
        asyncio.run(serve())
    finally:
        node.shutdown()
