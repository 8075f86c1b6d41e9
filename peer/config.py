"""PeerConfig: everything a peer is told on its command line, built once."""

from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass(frozen=True)
class PeerConfig:
    model_dir: str
    start: int | None  # None: the peer picks where the swarm is weakest (num_blocks of them, or as many as fit)
    end: int | None
    initial_peers: tuple[str, ...] = ()
    bootstrap_wait: float = 60.0  # seconds to keep trying the initial peers at start before giving up
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda if torch sees a GPU, else mps, else cpu
    quant: str = "none"  # weight format of the blocks: none, int8 or nf4 (bitsandbytes, via transformers)
    max_memory: int | None = None  # bytes; on the CPU the process's peak RSS, on a GPU its blocks and caches; None = a safe share of what is free
    host: str = "127.0.0.1"
    port: int = 0
    announce_maddrs: tuple[str, ...] = ()
    public_name: str = ""
    model_id: str | None = None  # None: derived from the checkpoint's config
    identity_path: str | None = None  # None: a fresh identity for this run
    maddr_file: str | None = None
    cache_tokens: int = 16384  # KV-cache budget, tokens per block, all sessions together
    prefix_cache: bool = True  # keep finished sessions' histories (within the budget) for reuse
    backward: bool = True  # serve the backward RPC (clients fine-tuning through the swarm)
    max_backward_tokens: int = 8192  # tokens x rows one backward request may carry
    max_session_length: int = 8192  # tokens
    max_message_bytes: int = 64 * 2**20  # bytes
    idle_timeout: float = 300.0  # seconds a session may sit without a step
    announce_period: float = 30.0  # seconds between re-announcements
    drain_timeout: float = 10.0  # seconds open sessions may take to finish after SIGTERM
    num_threads: int = 0  # torch threads; 0 keeps torch's default
    throughput: float | None = None  # steps/s to announce; None = measured at start
    num_blocks: int | None = None  # serve this many blocks, placed (and re-placed) automatically
    balance_period: float = 60.0  # mean seconds between rebalancing checks (with num_blocks); 0 = never
    balance_threshold: float = 0.2  # move only if the swarm's weakest block gets this much stronger
    placement_jitter: float = 2.0  # max seconds to wait before choosing blocks, so peers started together spread
    use_auto_relay: bool = False  # behind NAT: become reachable through relays (the initial peers by default)
    relay_maddrs: tuple[str, ...] = ()  # relays to announce this peer through
    no_listen: bool = False  # accept no direct connections (outbound only; implies --use-auto-relay)
    metrics_port: int | None = None  # serve Prometheus metrics over HTTP here (0 = any free port)
    adversary: str | None = None  # TESTING AID: "MODE[:RATE][@after=N]", see peer/adversary.py


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END (e.g. 0:8), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks needs 0 <= START < END, got {text!r}")
    return start, end


def _size(text: str) -> int:
    from peer.quant import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Long on purpose: one add_argument per flag of `swarmllm peer`.
    parser.add_argument("model_dir", metavar="MODEL",
                        help="a local transformers checkpoint folder (safetensors), or a hub repo id "
                             "org/name[@revision] (only the shards holding this peer's blocks are fetched)")
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of DHT nodes to join (e.g. the one `swarmllm dht` printed)")
    parser.add_argument("--bootstrap-wait", type=float, default=60.0, metavar="SECONDS",
                        help="if none of the initial peers answers at start, keep trying this long before "
                             "giving up (default 60; a bootstrap node restarting should delay a peer, not end it)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--blocks", type=parse_blocks, metavar="START:END", help="serve blocks START..END-1")
    where.add_argument("--num-blocks", type=int, metavar="N",
                       help="serve N blocks where the swarm is weakest, moving later if that helps the swarm "
                            "(default, with neither option: as many as fit in --max-memory)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="compute dtype (with --quant: what the quantized weights are multiplied in)")
    parser.add_argument("--quant", choices=["none", "int8", "nf4"], default="none",
                        help="store the blocks' linear weights in 8 bits (LLM.int8) or 4 bits (NF4) with "
                             "bitsandbytes: about 0.5x / 0.27x the memory of float16")
    parser.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                        help="on the CPU, the most RAM this peer's process may hold (its RSS, runtime included: "
                             "the peer takes as many blocks as keep it under); on a GPU, the memory its blocks and "
                             "KV cache may take; e.g. 12GiB (default: 80%% of the RAM available, or 90%% of the "
                             "GPU's free memory)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto: a GPU if torch sees one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs others should dial (behind port forwarding)")
    parser.add_argument("--name", default="", help="public name shown on the health page")
    parser.add_argument("--model-id", default=None, help="override the model id derived from config.json")
    parser.add_argument("--identity", default=None, metavar="PATH",
                        help="key file that keeps this peer's id across restarts (created if missing)")
    parser.add_argument("--maddr-file", default=None, metavar="PATH",
                        help="write this peer's multiaddrs here (one per line) once it is ready")
    parser.add_argument("--cache-tokens", type=int, default=16384,
                        help="KV-cache budget in tokens (batch x max_length summed over sessions)")
    parser.add_argument("--no-backward", action="store_true",
                        help="serve no backward passes (clients fine-tuning prompts or adapters through the swarm)")
    parser.add_argument("--max-backward-tokens", type=int, default=8192,
                        help="tokens x rows one backward request may carry")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="keep no finished session's cache for reuse by sessions that start the same way")
    parser.add_argument("--max-session-length", type=int, default=8192, help="longest session, tokens")
    parser.add_argument("--max-message-bytes", type=int, default=64 * 2**20,
                        help="largest tensor payload one message may carry, bytes")
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session closes")
    parser.add_argument("--announce-period", type=float, default=30.0, help="seconds between announcements")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="on SIGTERM, seconds to let open sessions finish before leaving")
    parser.add_argument("--throughput", type=float, default=None,
                        help="announce this many steps/s instead of measuring (e.g. a known-slow link)")
    parser.add_argument("--balance-period", type=float, default=60.0,
                        help="with --num-blocks: mean seconds between rebalancing checks (0 = never move)")
    parser.add_argument("--balance-threshold", type=float, default=0.2,
                        help="move only if the weakest block's throughput rises by this fraction")
    parser.add_argument("--placement-jitter", type=float, default=2.0,
                        help="with --num-blocks: wait up to this many seconds before choosing blocks")
    parser.add_argument("--use-auto-relay", action="store_true",
                        help="behind NAT: become reachable through a relay (a `swarmllm dht --relay` node)")
    parser.add_argument("--relay-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="relays to announce this peer through (default: the initial peers)")
    parser.add_argument("--no-listen", action="store_true",
                        help="accept no direct connections, only relayed ones (implies --use-auto-relay)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve this peer's Prometheus metrics at http://HOST:PORT/metrics (0 = any free port)")
    parser.add_argument("--adversary", default=None, metavar="MODE[:RATE][@after=N]",
                        help="TESTING AID: lie on a fraction RATE of steps, after serving the first N honestly; "
                             "MODE is one of noise, identity, skip, wrong_weights, low_precision, equivocate, "
                             "slow (see peer/adversary.py)")
    parser.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def from_args(args: argparse.Namespace) -> PeerConfig:
    start, end = args.blocks if args.blocks else (None, None)
    if args.adversary is not None:
        from peer.adversary import Adversary
        try:
            Adversary.parse(args.adversary)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if args.num_blocks is not None and args.num_blocks < 1:
        raise SystemExit(f"--num-blocks must be >= 1, got {args.num_blocks}")
    return PeerConfig(
        model_dir=args.model_dir, start=start, end=end, initial_peers=tuple(args.initial_peers), bootstrap_wait=args.bootstrap_wait,
        dtype=args.dtype, device=args.device, quant=args.quant, max_memory=args.max_memory, host=args.host, port=args.port,
        announce_maddrs=tuple(args.announce_maddrs), public_name=args.name, model_id=args.model_id,
        identity_path=args.identity, maddr_file=args.maddr_file, cache_tokens=args.cache_tokens,
        prefix_cache=not args.no_prefix_cache, backward=not args.no_backward,
        max_backward_tokens=args.max_backward_tokens, max_session_length=args.max_session_length, max_message_bytes=args.max_message_bytes, idle_timeout=args.idle_timeout,
        announce_period=args.announce_period, drain_timeout=args.drain_timeout, num_threads=args.num_threads,
        throughput=args.throughput, num_blocks=args.num_blocks, balance_period=args.balance_period, balance_threshold=args.balance_threshold,
        placement_jitter=args.placement_jitter, use_auto_relay=args.use_auto_relay or args.no_listen,
        relay_maddrs=tuple(args.relay_maddrs), no_listen=args.no_listen, adversary=args.adversary,
        metrics_port=args.metrics_port,
    )
