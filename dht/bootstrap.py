"""`swarmllm dht`: a bootstrap DHT node that other peers and clients join through."""

from __future__ import annotations

import argparse
import signal
import threading

from dht import directory, identity
from dht.ready import ready_line, write_maddr_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a public node)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="other bootstrap nodes")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs others should dial (public address behind port forwarding)")
    parser.add_argument("--identity", default=None, metavar="PATH",
                        help="key file that keeps this node's id (and so its multiaddr) across restarts")
    parser.add_argument("--relay", action="store_true",
                        help="relay traffic for peers behind NAT (run this on a publicly reachable host)")
    parser.add_argument("--maddr-file", default=None, metavar="PATH", help="write the node's multiaddrs here")


def main(args: argparse.Namespace) -> None:
    node_identity = identity.load_or_create(args.identity)
    node = directory.start_node(
        node_identity, args.initial_peers, host=args.host, port=args.port, announce_maddrs=args.announce_maddrs,
        relay_service=args.relay)
    maddrs = directory.visible_maddrs(node)
    write_maddr_file(args.maddr_file, maddrs)
    print(ready_line("dht", peer_id=node_identity.peer_id, maddrs=maddrs), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.shutdown()
