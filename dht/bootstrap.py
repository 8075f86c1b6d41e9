"""`swarmllm dht`: a bootstrap DHT node that other peers and clients join through."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

from dht import directory, identity

READY_PREFIX = "SWARMLLM_READY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a public node)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="other bootstrap nodes")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs others should dial (public address behind port forwarding)")
    parser.add_argument("--identity", default=None, metavar="PATH",
                        help="key file that keeps this node's id (and so its multiaddr) across restarts")
    parser.add_argument("--maddr-file", default=None, metavar="PATH", help="write the node's multiaddrs here")


def main(args: argparse.Namespace) -> None:
    node_identity = identity.load_or_create(args.identity)
    node = directory.start_node(
        node_identity, args.initial_peers, host=args.host, port=args.port, announce_maddrs=args.announce_maddrs)
    maddrs = directory.visible_maddrs(node)
    if args.maddr_file:
        tmp = args.maddr_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(maddrs) + "\n")
        os.replace(tmp, args.maddr_file)
    print(f"{READY_PREFIX} " + json.dumps({"role": "dht", "peer_id": node_identity.peer_id, "maddrs": maddrs}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.shutdown()
