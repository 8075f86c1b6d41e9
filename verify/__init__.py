"""swarmllm verify: catching peers that compute wrong results.

Files:
- compare.py     per-token relative error of the span's update (output - input), per-dtype thresholds (pure)
- policy.py      which sessions to audit, by the peer's standing and the sessions since its last audit;
                 detection probability, expected wrong generations before an audit (pure)
- reputation.py  the reputation book: Beta reputation with forgetting, probation, growing bans (pure)
- auditor.py     re-runs a sampled span on another same-dtype peer, asks a referee on disagreement,
                 records and publishes the verdict (network access injected; never imports client)
- proofs.py      fraud proofs: a peer's signed outputs with the inputs to re-run them; checked without a
                 network (chain, digests, the accused's signature), then judged by a re-run (pure)

The client (client/audits.py, client/session.py) wires these in: every closed session offers its spans to the auditor,
routing skips banned peers, verdicts are published on the DHT signed by the client, and a confirmed lie
is proven to every other client (client/proofs.py).
"""
