"""swarmllm bench: the benchmarks (every timing claim of the README comes from here; bench/README.md runs them).

Files:
- harness.py         what the speed benchmarks share: a local swarm behind optional WAN proxies, fresh prompts, clocks,
                     tables, JSON
- wanproxy.py        WAN emulation without netem: a loopback TCP proxy with delay, jitter, loss and upload caps
- decode.py          per-token latency and time to first token, local transformers vs a 3-peer swarm
- concurrency.py     aggregate tokens/s of 1, 2, 4, 8 clients at once
- speculative.py     greedy vs prompt lookup vs a draft model; time to first token with a known system prompt
- failover.py        SIGKILL / SIGSTOP a peer mid-generation: time from the fault to the next token
- memory.py          each peer's resident memory next to the bytes of the weights it serves
- families.py        per family: loads, equals local through a swarm, what a block costs
- probe_families.py  in-process probe of one family's block runners, no swarm
- verify.py          wrong generations a liar hands out before its ban; strict mode's latency cost
- calibrate.py       honest disagreement between two correct peers (verify/compare.py's thresholds)
- finetune.py        seconds per training step through the swarm vs local
- directory.py       the DHT directory at thousands of signed identities on 50 DHT node processes
- soak.py            hours of faults (kills, freezes, restarts, the DHT node, a long-con liar) under non-stop clients
- soak_clients.py    one soak client process per kind (greedy, sampled, speculative, strict, API streaming)
- soakstats.py       the soak report's arithmetic (windows, percentiles, resource tables), pure
- plot.py            docs/bench.png from bench/results/*.json
"""
