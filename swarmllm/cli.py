"""The `swarmllm` console script: dht | peer | generate | api | health | demo."""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    parser = argparse.ArgumentParser(prog="swarmllm", description="run LLMs over a peer-to-peer swarm")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    from api import cli as api_cli
    from client import cli as client_cli
    from dht import bootstrap
    from health import cli as health_cli
    from peer import config as peer_config
    from swarmllm import demo

    bootstrap.add_arguments(sub.add_parser("dht", help="run a bootstrap DHT node"))
    peer_config.add_arguments(sub.add_parser("peer", help="serve a range of a model's blocks"))
    client_cli.add_arguments(sub.add_parser("generate", help="generate text through the swarm"))
    api_cli.add_arguments(sub.add_parser("api", help="serve an OpenAI-compatible API in front of the swarm"))
    health_cli.add_arguments(sub.add_parser("health", help="serve the swarm health page"))
    demo.add_arguments(sub.add_parser("demo", help="start a local swarm of 3 peers and generate through it"))

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "dht":
        bootstrap.main(args)
    elif args.command == "peer":
        from peer import server
        server.main(peer_config.from_args(args))
    elif args.command == "generate":
        client_cli.main(args)
    elif args.command == "api":
        api_cli.main(args)
    elif args.command == "health":
        health_cli.main(args)
    elif args.command == "demo":
        demo.main(args)


if __name__ == "__main__":
    main()
