"""swarmllm api: an OpenAI-compatible HTTP API in front of the swarm.

Files:
- core.py    pure: OpenAI-shaped errors, request checks -> SamplingParams, per-choice incremental
             decoding with stop sequences, response / server-sent-event chunk JSON
- schema.py  pydantic models of the requests (shared by the endpoints and /docs)
- engine.py  runs generate() on worker threads (sessions in parallel), streams text to the event
             loop, cancels a generation whose client went away
- app.py     FastAPI: /v1/models, /v1/completions, /v1/chat/completions, errors, optional API key
- cli.py     `swarmllm api MODEL_DIR --initial-peers ...`
"""

from api.app import ApiConfig, make_app
from api.core import ApiError, ChoiceDecoder, SamplingParams
from api.engine import Engine

__all__ = ["ApiConfig", "ApiError", "ChoiceDecoder", "Engine", "SamplingParams", "make_app"]
