"""`swarmllm api MODEL_DIR --initial-peers MADDR... [--host 127.0.0.1] [--port 8080] [--api-key KEY]`:
serve the OpenAI API for the model whose blocks the swarm runs."""

from __future__ import annotations

import argparse
import asyncio
import os

from client import options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL",
                        help="local checkpoint folder or hub repo id org/name[@revision] (embeddings, norm, head, "
                             "tokenizer)")
    options.add_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (0 = any free port)")
    parser.add_argument("--api-key", default=os.environ.get("SWARMLLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $SWARMLLM_API_KEY; unset = no key)")
    parser.add_argument("--model-name", default=None,
                        help="the name clients pass as 'model' (default: the checkpoint directory's name)")
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="generations run at once (each holds one swarm session); more requests wait")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="completion tokens when a request sets no max_tokens")
    parser.add_argument("--route-timeout", type=float, default=10.0,
                        help="seconds a request waits for peers to cover missing blocks before a 503")
    parser.add_argument("--token-timeout", type=float, default=120.0,
                        help="seconds a request waits for its next token before a 504")


def model_name(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir))


def main(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from api.app import ApiConfig, make_app
    from api.engine import Engine
    from client import AutoDistributedModelForCausalLM
    from dht.ready import serve_http

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model_dir, args.initial_peers,
                                                            route_timeout=args.route_timeout, **options.config_kwargs(args))
    engine = Engine(model, tokenizer, max_concurrency=args.max_concurrency, token_timeout=args.token_timeout)
    text_config = model.config.get_text_config(decoder=True)
    cfg = ApiConfig(model_name=args.model_name or model_name(args.model_dir), aliases=(model.swarm.cfg.model_id,),
                    api_key=args.api_key or None, context_length=text_config.max_position_embeddings,
                    default_max_tokens=args.default_max_tokens)

    async def serve() -> None:
        await serve_http(make_app(engine, cfg), args.host, args.port, "api", path="/v1", model=cfg.model_name)

    try:
        asyncio.run(serve())
    finally:
        engine.close()
        model.swarm.shutdown()
