"""Shared by the serving tests."""

from lckv_jax.generation import chunked_length, generate


def offline_tokens(model, ps, budgets, prefill_chunk=None, prefill_widths=None, **kw
                   ) -> list[list[int]]:
  """The tokens `generate` gives each prompt of `ps` alone (greedy unless `kw` says otherwise),
  for its budget: the reference a server's requests are held to.

  Every call decodes the longest budget into one cache length and keeps the first `budget`
  tokens, so the test compiles one decode loop, not one per budget (a test's time here is XLA
  compiling: 16 requests took 32 decode compilations). Without EOS a row's first n tokens do not
  depend on its budget, nor on the cache's length: the engine's rows, whose cache is longer than
  any of these, are held to them.
  """
  most = max(budgets)
  padded = [len(p) if prefill_chunk is None else
            chunked_length(len(p), prefill_chunk, prefill_widths)
            for p in ps]
  max_len = max(padded) + most
  return [generate(model, [p], max_new_tokens=most, max_len=max_len, prefill_chunk=prefill_chunk,
                   prefill_widths=prefill_widths, **kw).tokens[0][:n] for p, n in zip(ps, budgets)]
