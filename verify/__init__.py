"""swarmllm verify: catching peers that compute wrong results (issue 4; not built yet).

Planned files (see ../shared/notes/verification.md and the README's architecture section):
- policy.py      which steps to re-run on a redundant peer (pure, seeded)
- compare.py     activation comparison with per-dtype tolerances (pure)
- auditor.py     replays sampled hops on other peers serving the same blocks (network injected)
- reputation.py  the reputation book that routing respects
Nothing here is imported yet; the package exists so the layout and the import rules hold.
"""
