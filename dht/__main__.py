"""`python -m dht`: run a bootstrap node (same as `swarmllm dht`)."""
import argparse

from dht import bootstrap

parser = argparse.ArgumentParser(prog="python -m dht", description=bootstrap.__doc__)
bootstrap.add_arguments(parser)
bootstrap.main(parser.parse_args())
