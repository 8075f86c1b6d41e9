"""`python -m peer MODEL_DIR --blocks A:B ...` (same as `swarmllm peer`)."""
import argparse
import logging

from peer import config, server

parser = argparse.ArgumentParser(prog="python -m peer", description="serve a range of a model's blocks")
config.add_arguments(parser)
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
server.main(config.from_args(parser.parse_args()))
