"""Serving: an OpenAI-compatible HTTP server (`api`) over continuous batching (`engine`).

    python -m lckv_jax.serve --checkpoint DIR [--port 8000] [--max_batch N | --memory_bytes B]
"""

# Prompt tokens the engine prefills per call by default (`engine.Engine(prefill_chunk=)`); here,
# beside no import of jax, so that `--help` shows it quickly.
PREFILL_CHUNK = 256
# Prompt tokens prefilled between two decode calls at most (`Engine(prefill_tokens_per_tick=)`).
PREFILL_TOKENS_PER_TICK = 8192
