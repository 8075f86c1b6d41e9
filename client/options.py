"""The client options that `swarmllm generate` and `swarmllm api` share: one definition, one help text."""

from __future__ import annotations

import argparse

from client.config import VERIFY_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--initial-peers, --model-id, --verify-mode and --formats (read back with ``config_kwargs``)."""
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR",
                        help="multiaddrs of any DHT node of the swarm (a peer's or a bootstrap node's)")
    parser.add_argument("--model-id", default=None, help="the swarm's model id (default: derived from the config)")
    parser.add_argument("--verify-mode", choices=VERIFY_MODES, default="background",
                        help="background: audits never delay output; redo: wait for this generation's sampled "
                             "audits and generate again without a peer caught lying; strict: output only after "
                             "every span any peer served (trusted ones too) was re-run on another peer and matched "
                             "(slower: see the README's Verification section)")
    parser.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                        help="peer formats a route may use and mix: DTYPE, QUANT or DTYPE/QUANT (e.g. nf4, "
                             "bfloat16/int8); default: one format per generation, the most precise that covers "
                             "every block")


def config_kwargs(args: argparse.Namespace) -> dict:
    """The ``from_pretrained`` keywords these options set."""
    return {"model_id": args.model_id, "verify_mode": args.verify_mode, "formats": args.formats}
