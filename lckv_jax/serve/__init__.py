"""Serving: an OpenAI-compatible HTTP server (`api`) over continuous batching (`engine`).

    python -m lckv_jax.serve --checkpoint DIR [--port 8000] [--max_batch N | --memory_bytes B]
"""
