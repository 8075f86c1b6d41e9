"""swarmllm health: the public swarm health page.

Files:
- schema.py    pydantic models of the snapshot (shared by the page, the JSON API and /docs)
- snapshot.py  builds the snapshot from records, pings and verdicts (pure)
- monitor.py   reads the DHT index and verdicts, pings every peer's info RPC, refreshes periodically
- app.py       FastAPI: `/` (page), `/api/v1/state`, `/api/v1/peers/{id}`, `/metrics` (Prometheus)
- cli.py       `swarmllm health`
"""
