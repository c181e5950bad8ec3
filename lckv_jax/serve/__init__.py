"""Serving: an OpenAI-compatible HTTP server (`api`) over continuous batching (`engine`).

    python -m lckv_jax.serve --checkpoint DIR [--port 8000] [--max_batch N | --memory_bytes B]
"""

# Prompt tokens the engine prefills per call by default (`engine.Engine(prefill_chunk=)`); here,
# beside no import of jax, so that `--help` shows it quickly.
PREFILL_CHUNK = 256
# Prompt tokens prefilled between two decode calls at most (`Engine(prefill_tokens_per_tick=)`):
# by default this, or twice the tokens a full tick decodes where that is more
# (`prefill_budget`).
PREFILL_TOKENS_PER_TICK = 8192
# Decode steps between two admissions (`Engine(steps_per_tick=)`); while requests wait for a
# row, twice as many by default (`Engine(busy_steps_per_tick=)`).
STEPS_PER_TICK = 8
# Prompts prefilled together in one call at most (`Engine(prefill_rows=)`): 8 chunks of 256 are
# 2,048 tokens a call, enough for the matmuls to outweigh reading the weights.
PREFILL_ROWS = 8


def group_sizes(prefill_rows: int) -> list[int]:
  """Rows of a prefill job: the powers of two up to `prefill_rows`, largest first (a few compiled
  calls; any number of prompts splits into them, 7 as 4 + 2 + 1)."""
  return [1 << i for i in reversed(range(prefill_rows.bit_length()))]


def prefill_budget(max_batch: int, steps_per_tick: int) -> int:
  """The default prompt tokens prefilled a tick: `PREFILL_TOKENS_PER_TICK`, or twice the tokens a
  full tick decodes (`max_batch` x `steps_per_tick`, a busy tick's steps) where that is more.

  A batch stays full only if each tick refills the rows that finish in it, and those grow with
  the batch: a saturated 1b LCKV server of 5,082 rows frees about 300 rows a 16-step tick (outputs
  of 272 tokens on average), 95,000 prompt slots. Under a fixed 65,536 it ran at most 2,888 rows
  of the 5,082 it held (mean 2,145), and a decode step costs as much for a free row as for a
  running one. Twice a tick's decoded tokens keep the batch full while prompts are up to about
  twice as long as outputs; a smaller budget bounds the running requests' pause instead.
  """
  return max(PREFILL_TOKENS_PER_TICK, 2 * max_batch * steps_per_tick)
