"""Serving: an OpenAI-compatible HTTP server (`api`) over continuous batching (`engine`).

    python -m lckv_jax.serve --checkpoint DIR [--port 8000] [--max_batch N | --memory_bytes B]
"""

# Prompt tokens the engine prefills per call by default (`engine.Engine(prefill_chunk=)`); here,
# beside no import of jax, so that `--help` shows it quickly.
PREFILL_CHUNK = 256
# Prompt tokens prefilled between two decode calls at most (`Engine(prefill_tokens_per_tick=)`).
PREFILL_TOKENS_PER_TICK = 8192
# Decode steps between two admissions (`Engine(steps_per_tick=)`).
STEPS_PER_TICK = 8
# Prompts prefilled together in one call at most (`Engine(prefill_rows=)`): 8 chunks of 256 are
# 2,048 tokens a call, enough for the matmuls to outweigh reading the weights.
PREFILL_ROWS = 8


def group_sizes(prefill_rows: int) -> list[int]:
  """Rows of a prefill job: the powers of two up to `prefill_rows`, largest first (a few compiled
  calls; any number of prompts splits into them, 7 as 4 + 2 + 1)."""
  return [1 << i for i in reversed(range(prefill_rows.bit_length()))]
