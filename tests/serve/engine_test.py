"""Continuous batching (lckv_jax/serve/engine.py): requests joining and leaving a running batch
get exactly the tokens they get alone; long prompts prefilled in chunks between decode calls."""

import threading
import time

import jax
import pytest

from lckv_jax.generation import Generator, generate
from lckv_jax.sampling import Sampling
from lckv_jax.serve import prefill_budget
from lckv_jax.serve.engine import Engine, QueueFull, Request
from tests.generation_test import prompts
from tests.serve import offline_tokens


class _Sink:
  """Collects one request's tokens; `done` is set with its finish reason."""

  def __init__(self):
    self.tokens, self.reason, self.done = [], None, threading.Event()

  def __call__(self, tokens, reason):
    self.tokens += tokens
    if reason is not None:
      self.reason = reason
      self.done.set()


@pytest.fixture(scope="module")
def model():
  from tests import tiny
  # A cycle prefilled with two iterations: chunked and whole prompts give different tokens.
  return tiny.tiny_model(std=0.1, layer_types="0_2_2_3", max_position_embeddings=128,
                         forward_passes=1, backward_passes=1)


def _engine(model, **kw):
  kw = {"max_batch": 4, "max_prompt": 20, "max_tokens": 12, "steps_per_tick": 3, **kw}
  engine = Engine(model, **kw)
  engine.start()
  return engine


def _greedy(engine, ps, budgets) -> list[_Sink]:
  """Submits greedy requests of prompts `ps` for `budgets` new tokens; their sinks once done."""
  sinks = [_Sink() for _ in ps]
  for p, n, sink in zip(ps, budgets, sinks):
    engine.submit(Request(p, n, Sampling(), 0, sink))
  for sink in sinks:
    assert sink.done.wait(120)
  return sinks


def _prefill_shapes(monkeypatch) -> list[tuple[int, int]]:
  """The [rows, tokens] of every prefill call the model makes from now on."""
  from lckv_jax import generation
  shapes, real = [], generation.prefill

  def prefill(model, tokens, *args, **kw):
    shapes.append(tuple(tokens.shape))
    return real(model, tokens, *args, **kw)
  monkeypatch.setattr(generation, "prefill", prefill)
  return shapes


@pytest.mark.parametrize("chunk", [4, None])
def test_the_model_prefills_at_most_prefill_rows_prompts_at_once(model, chunk, monkeypatch):
  # The batch starts as free rows made without the model. It was once `start` on max_batch
  # one-token prompts: with a chunk of 256 that prefilled [max_batch, 256] tokens at once, and
  # its attention scores (6.4 GiB at 7b, 205 rows) ran the H200 out of its 24 GB cap at start.
  # Jobs hold up to `prefill_rows` prompts (a power of two); whole prompts go one at a time.
  calls = _prefill_shapes(monkeypatch)
  engine = _engine(model, max_batch=6, prefill_chunk=chunk, prefill_rows=3)
  try:
    _greedy(engine, prompts([3, 9, 14], seed=2), [4, 2, 5])
  finally:
    engine.stop()
  assert calls and {rows for rows, _ in calls} == ({1, 2} if chunk else {1})


def test_prompts_admitted_together_prefill_in_one_call_each_chunk(model, monkeypatch):
  # Five prompts of two chunks and one of one, admitted in one tick: jobs of 4 and 1 (two
  # chunks each) and of 1, and every request gets the tokens it gets alone.
  ps = prompts([5, 6, 8, 7, 5, 3], seed=4)
  engine = Engine(model, max_batch=6, max_prompt=20, max_tokens=6, prefill_chunk=4,
                  prefill_rows=4, steps_per_tick=2)
  engine.warm_up()
  calls = _prefill_shapes(monkeypatch)
  sinks = [_Sink() for _ in ps]
  for p, sink in zip(ps, sinks):
    engine.submit(Request(p, 6, Sampling(), 0, sink))
  while not all(s.done.is_set() for s in sinks):
    engine.tick()
  assert sorted(calls) == sorted([(4, 4)] * 2 + [(1, 4)] * 3)
  assert [sink.tokens for sink in sinks] == offline_tokens(model, ps, [6] * len(ps),
                                                          prefill_chunk=4)


@pytest.mark.parametrize("lookahead", [None, 0])
def test_admission_fills_a_job_with_waiting_prompts_of_its_shape(model, lookahead, monkeypatch):
  # Two rows, jobs of up to 2, four prompts waiting of 1, 2, 1 and 2 chunks of 4. In arrival
  # order (lookahead 0) the first two rows take prompts of 1 and 2 chunks: jobs of one prompt
  # each, three [1, *] calls. Looking past the oldest (default) pairs the two 1-chunk prompts,
  # then the two 2-chunk ones: every call prefills 2 rows, the oldest request's first.
  ps = prompts([3, 6, 2, 7], seed=5)
  engine = Engine(model, max_batch=2, max_prompt=20, max_tokens=5, prefill_chunk=4,
                  prefill_rows=2, steps_per_tick=5, admit_lookahead=lookahead)
  assert engine.admit_lookahead == (16 if lookahead is None else 0)
  engine.warm_up()
  calls = _prefill_shapes(monkeypatch)
  sinks = [_Sink() for _ in ps]
  for p, sink in zip(ps, sinks):
    engine.submit(Request(p, 5, Sampling(), 0, sink))
  engine.tick()
  first = [i for i, sink in enumerate(sinks) if sink.tokens]  # the requests of the first tick
  while not all(s.done.is_set() for s in sinks):
    engine.tick()
  if lookahead is None:
    assert first == [0, 2]
    assert calls == [(2, 4)] * 3
  else:
    assert first == [0, 1]
    assert [rows for rows, _ in calls] == [1] * 6
  assert [sink.tokens for sink in sinks] == offline_tokens(model, ps, [5] * len(ps),
                                                          prefill_chunk=4)


@pytest.mark.parametrize("chunk, widths", [(4, None), (None, None), (4, 4)])
def test_sixteen_requests_through_four_rows_get_their_offline_tokens(model, chunk, widths):
  # Chunks of 4: prompts of 1 to 5 chunks, first chunks of 1, 2 or 4 tokens (widths 4: 1 to 4);
  # None: each prompt whole, padded to its bucket.
  engine = _engine(model, prefill_chunk=chunk, prefill_widths=widths)  # started: warmed up,
  compiles = []  # everything it runs compiled
  listener = lambda event, seconds, **kw: compiles.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ps = prompts([3, 17, 5, 9, 1, 12, 20, 2, 7, 14, 4, 11, 6, 19, 8, 10], seed=21)
    budgets = [12, 3, 7, 12, 1, 9, 5, 12, 2, 8, 12, 4, 6, 10, 11, 12]
    sinks = _greedy(engine, ps, budgets)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    engine.stop()
  # Prompts of 1 to 20 tokens, in any row, any number finishing at once: nothing compiled.
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  for sink, want in zip(sinks, offline_tokens(model, ps, budgets, prefill_chunk=chunk,
                                              prefill_widths=widths)):
    assert sink.reason == "length"
    assert sink.tokens == want
  # The chunks are seen: the longest prompt (5 chunks) gets other tokens prefilled whole.
  whole = generate(model, [ps[6]], max_new_tokens=budgets[6]).tokens[0]
  assert (sinks[6].tokens != whole) == (chunk is not None)
  assert engine.stats.running == 0 and engine.stats.requests_finished == 16
  assert engine.stats.tokens_generated == sum(budgets)


def test_sampled_requests_follow_their_seed_and_cancel_frees_the_row(model):
  engine = _engine(model, max_batch=2, steps_per_tick=1)
  try:
    long, short = _Sink(), _Sink()
    engine.submit(Request(prompts([6], seed=1)[0], 12, Sampling(0.9, 10), 5, long))
    engine.submit(Request(prompts([4], seed=2)[0], 12, Sampling(1.0), 77, short))
    assert short.done.wait(60) and short.reason == "length"
    gen = Generator(model, max_new_tokens=12, max_len=engine.max_len, per_row_sampling=True,
                    prefill_chunk=engine.prefill_chunk)
    alone = gen.decode(gen.start([prompts([4], seed=2)[0]], sampling=[Sampling(1.0)],
                                 seeds=[77]))
    assert short.tokens == gen.results(alone)[0]
    assert long.done.wait(60)
    # A cancelled request ends at the next tick with what it had, and its row is free again.
    stuck = _Sink()
    req = Request(prompts([3], seed=3)[0], 12, Sampling(), 0, stuck)
    engine.submit(req)
    deadline = time.monotonic() + 60
    while not stuck.tokens and time.monotonic() < deadline:
      time.sleep(0.005)
    engine.cancel(req)
    assert stuck.done.wait(60) and stuck.reason == "cancelled" and len(stuck.tokens) < 12
    while engine.stats.running and time.monotonic() < deadline:
      time.sleep(0.01)
    assert engine.stats.running == 0
  finally:
    engine.stop()


def test_the_engine_refuses_what_it_cannot_take(model):
  engine = Engine(model, max_batch=1, max_prompt=8, max_tokens=4, max_waiting=2)
  with pytest.raises(ValueError, match="at most 8"):
    engine.submit(Request(list(range(9)), 2, Sampling(), 0, _Sink()))
  with pytest.raises(ValueError, match=r"max_tokens must be in 1\.\.4"):
    engine.submit(Request([1], 5, Sampling(), 0, _Sink()))
  engine.submit(Request([1], 2, Sampling(), 0, _Sink()))
  engine.submit(Request([1], 2, Sampling(), 0, _Sink()))
  with pytest.raises(QueueFull):  # not started: nothing leaves the queue
    engine.submit(Request([1], 2, Sampling(), 0, _Sink()))
  with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=128"):
    Engine(model, max_batch=1, max_prompt=100, max_tokens=100)
  with pytest.raises(ValueError, match="prefill_chunk must be a positive integer or None, got 0"):
    Engine(model, max_batch=1, max_prompt=8, max_tokens=4, prefill_chunk=0)
  with pytest.raises(ValueError, match="prefill_tokens_per_tick must be an integer >= 1, got 0"):
    Engine(model, max_batch=1, max_prompt=8, max_tokens=4, prefill_tokens_per_tick=0)
  # A row's cache holds the longest prompt as padded (`chunked_length`: 10 tokens in chunks of
  # 4 are a first chunk of 2 and two of 4; in chunks of 6, two of 6; or a bucket) and its
  # budget; a chunk longer than the longest prompt would only pad further: it is cut to
  # max_prompt.
  for chunk, max_len in ((4, 10 + 4), (6, 12 + 4), (None, 16 + 4), (256, 10 + 4)):
    engine = Engine(model, max_batch=2, max_prompt=10, max_tokens=4, prefill_chunk=chunk)
    assert engine.max_len == max_len and engine.stats.cache_slots == 2 * max_len
  assert engine.prefill_chunk == 10


def _tick_until_done(engine, sinks, ticks=200):
  for _ in range(ticks):
    if all(s.done.is_set() for s in sinks):
      return
    engine.tick()
  raise AssertionError(f"not done after {ticks} ticks")


def test_rows_admitted_count_as_taken_while_their_prompts_prefill(model, monkeypatch):
  # /metrics and a drain (`stop`) read these counts while the engine prefills: a row refilled
  # this tick is taken (prefilling) from its admission on, not only once the tick's tokens are
  # collected, so a saturated server shows a full batch (benchmarks.serve_load's full-batch
  # windows), and a request admitted into an idle server is never neither waiting nor running.
  engine = Engine(model, max_batch=3, max_prompt=20, max_tokens=12, steps_per_tick=1,
                  prefill_chunk=4)
  engine.warm_up()
  first, second, third = _Sink(), _Sink(), _Sink()
  engine.submit(Request(prompts([3])[0], 6, Sampling(), 0, first))
  engine.tick()
  assert (engine.stats.running, engine.stats.prefilling) == (1, 0)
  seen, real = [], engine._prefill

  def prefill():
    seen.append((engine.stats.running, engine.stats.prefilling, engine.stats.waiting))
    real()
  monkeypatch.setattr(engine, "_prefill", prefill)
  for p, sink in zip(prompts([5, 9], seed=3), (second, third)):
    engine.submit(Request(p, 3, Sampling(), 0, sink))
  engine.tick()
  assert seen == [(1, 2, 0)]  # the two admitted rows, before any of their chunks ran
  _tick_until_done(engine, [first, second, third])
  # Into an idle server: during its prefill the request counts as prefilling.
  seen.clear()
  fourth = _Sink()
  engine.submit(Request(prompts([4], seed=4)[0], 2, Sampling(), 0, fourth))
  engine.tick()
  assert seen == [(0, 1, 0)]
  _tick_until_done(engine, [fourth])


def test_a_long_prompt_prefills_between_decode_calls_and_cancelling_it_frees_the_row(model):
  # Ticks driven by hand (warmed up, not started): one chunk of 4 and one decode step a tick.
  engine = Engine(model, max_batch=2, max_prompt=20, max_tokens=12, steps_per_tick=1,
                  prefill_chunk=4, prefill_tokens_per_tick=4)
  engine.warm_up()
  short, long = prompts([3, 18], seed=22)
  runner, waiter = _Sink(), _Sink()
  engine.submit(Request(short, 12, Sampling(), 0, runner))
  engine.tick()  # one chunk, inserted: its first token, then a decode step
  assert len(runner.tokens) == 2
  engine.submit(Request(long, 6, Sampling(), 0, waiter))  # 18 tokens: 5 chunks
  seen = []
  for _ in range(5):
    engine.tick()
    seen.append((len(runner.tokens), engine.stats.prefilling, len(waiter.tokens)))
  # The running row gets a token every tick while the long prompt goes in, chunk by chunk. While a
  # prefill follows, a tick's decoded token goes out in the next tick, as soon as its prefill call
  # is dispatched (the hand-out runs while the device prefills); with none to follow, at once.
  assert seen == [(2, 1, 0), (3, 1, 0), (4, 1, 0), (5, 1, 0), (7, 0, 2)]
  # Slots in use: each prompt padded (`chunked_length`: 3 to a first chunk of 4; 18 to a first
  # chunk of 2 and four of 4), and the tokens so far.
  assert engine.stats.cache_slots_used == 4 + 7 + 18 + 2
  _tick_until_done(engine, [runner, waiter])
  assert runner.tokens == generate(model, [short], max_new_tokens=12, prefill_chunk=4).tokens[0]
  assert waiter.tokens == generate(model, [long], max_new_tokens=6, prefill_chunk=4).tokens[0]
  # Cancelled mid-prefill: the request ends with no tokens and its row is free again.
  gone, nxt = _Sink(), _Sink()
  req = Request(long, 6, Sampling(), 0, gone)
  engine.submit(req)
  engine.tick()
  engine.tick()
  assert engine.stats.prefilling == 1 and not gone.done.is_set()
  engine.cancel(req)
  engine.tick()
  assert gone.reason == "cancelled" and gone.tokens == []
  assert engine.stats.prefilling == 0 and engine.stats.running == 0
  engine.submit(Request(short, 4, Sampling(), 0, nxt))
  _tick_until_done(engine, [nxt])
  assert nxt.tokens == generate(model, [short], max_new_tokens=4, prefill_chunk=4).tokens[0]
  assert engine.stats.requests_finished == 4


def test_the_prefill_budget_refills_every_free_row_in_a_tick_by_default(model):
  # A full batch needs as many admissions a tick as rows free: one chunk a tick (the first
  # engine's rule) left a large batch mostly empty under load. The budget counts the tokens of
  # whole calls (rows x the call's width, padding included, at least one call), oldest job first.
  ps = prompts([3, 4, 2, 7, 4, 1], seed=23)  # 1, 1, 1, 2, 1, 1 chunks of 4
  # One prompt a job: first chunks of 4, 4, 2, then [7] in two calls of 4, then 4 and 1. With
  # 11 tokens a tick: 4 + 4 + 2 (the next, 4, is over), then 4 + 4, then 4 + 1. (Charged a whole
  # chunk, the prompts of 2 and 1 took 4 each: [2, 3, 5].) Jobs of up to 4, in order of their
  # first prompt's arrival: [3, 4, 2, 4] (16 tokens a call, over a budget of 4 but the tick's
  # first), [7] in two calls, [1].
  for budget, rows, running in ((4, 1, [1, 2, 3]), (11, 1, [3, 4, 6]), (None, 1, [6, 6, 6]),
                                (4, 4, [4, 4, 5]), (None, 4, [6, 6, 6])):
    kw = {} if budget is None else {"prefill_tokens_per_tick": budget}
    engine = Engine(model, max_batch=6, max_prompt=8, max_tokens=12, steps_per_tick=1,
                    prefill_chunk=4, prefill_rows=rows, **kw)
    assert engine.prefill_tokens_per_tick == (8192 if budget is None else budget)
    engine.warm_up()
    sinks = [_Sink() for _ in ps]
    for p, sink in zip(ps, sinks):
      engine.submit(Request(p, 12, Sampling(), 0, sink))
    seen = []
    for _ in range(3):
      engine.tick()
      seen.append(engine.stats.running)
    assert seen == running, (budget, rows)
  _tick_until_done(engine, sinks)
  assert [sink.tokens for sink in sinks] == offline_tokens(model, ps, [12] * len(ps),
                                                          prefill_chunk=4)
  # A large batch frees more rows a tick: by default the budget is twice a full busy tick's
  # decoded tokens (16 steps here) where that is over 8,192.
  assert Engine(model, max_batch=1024, max_prompt=8, max_tokens=12, steps_per_tick=8,
                prefill_chunk=4).prefill_tokens_per_tick == 32768
  assert [prefill_budget(b, s) for b, s in ((6, 1), (512, 8), (5082, 16))] == [8192, 8192,
                                                                                162624]


@pytest.mark.parametrize("busy", [None, 2])
def test_a_tick_decodes_more_steps_while_requests_wait_for_a_row(model, busy, monkeypatch):
  # One row, three requests: while one waits, a tick decodes busy_steps_per_tick (default twice
  # steps_per_tick) steps; with none waiting, steps_per_tick. Tokens are those of `generate`.
  engine = Engine(model, max_batch=1, max_prompt=8, max_tokens=12, steps_per_tick=2,
                  busy_steps_per_tick=busy)
  assert engine.busy_steps_per_tick == (4 if busy is None else 2)
  engine.warm_up()
  steps, real = [], engine.gen.decode

  def decode(state, num_steps=None):
    steps.append(num_steps)
    return real(state, num_steps)
  monkeypatch.setattr(engine.gen, "decode", decode)
  ps = prompts([3, 5, 4], seed=31)
  sinks = [_Sink() for _ in ps]
  for p, sink in zip(ps, sinks):
    engine.submit(Request(p, 6, Sampling(), 0, sink))
  _tick_until_done(engine, sinks)
  # Each request: its first token at prefill, then 5 more. The first two decode while another
  # waits (4 + 1 steps, the loop stops at the budget); the last alone, 2 steps a tick.
  b = engine.busy_steps_per_tick
  assert steps == ([4, 4, 4, 4, 2, 2, 2] if b == 4 else [2] * 9)
  assert [sink.tokens for sink in sinks] == offline_tokens(model, ps, [6] * 3)
  with pytest.raises(ValueError, match="busy_steps_per_tick must be an integer >= 1, got 0"):
    Engine(model, max_batch=1, max_prompt=8, max_tokens=4, busy_steps_per_tick=0)


def test_a_quantized_cache_serves_the_tokens_generate_gives_with_it(model):
  # int8 K and V with their scales, rows inserted into and freed from a running batch and
  # prompts prefilled in chunks: each request gets what `generate` gives it alone with the same
  # cache storage.
  engine = _engine(model, max_batch=2, prefill_chunk=4, cache_dtype="int8")
  try:
    ps = prompts([3, 17, 9, 1], seed=22)
    budgets = [12, 3, 7, 5]
    sinks = _greedy(engine, ps, budgets)
  finally:
    engine.stop()
  assert engine.gen.cache_dtype == jax.numpy.int8
  want = offline_tokens(model, ps, budgets, prefill_chunk=4, cache_dtype="int8")
  assert [sink.tokens for sink in sinks] == want


def test_the_server_sizes_a_quantized_cache_to_about_twice_the_rows():
  # 7b's shape under the 24 GB cap with the load test's rows (512 + 512 slots): int8 and fp8 store
  # a byte per element and a float32 scale per token and KV head (1/64 of bf16's bytes at head_dim
  # 128), so about twice bf16's rows fit beside the same weights, the reserve and the row being
  # prefilled (whose cache is smaller too: llama 14 -> 29 rows).
  from benchmarks.common import config_path
  from lckv_jax import roofline
  from lckv_jax.config import model_from_file
  from lckv_jax.serve.__main__ import rows_that_fit
  cap, slots = 25_507_659_776, 1024
  for layer_types in ("llama", "lckv"):
    cfg = model_from_file(config_path("7b"), layer_types=layer_types, dtype="bfloat16",
                          param_dtype="bfloat16")
    weights = 2 * roofline.param_count(cfg)
    bf16 = rows_that_fit(cfg, cap, weights, slots)
    for name in ("int8", "fp8"):
      assert 1.9 * bf16 <= rows_that_fit(cfg, cap, weights, slots, name) <= 2.1 * bf16


def test_prefill_rows_cost_the_batch_at_most_a_sixteenth_of_its_rows():
  # A job's cache and activations grow with its rows: 7b llama's row cache is 537 MB, so it
  # prefills one prompt at a time under 24 GB; LCKV's is 50 MB (a few at once); 1b's are small.
  from benchmarks.common import config_path
  from lckv_jax import roofline
  from lckv_jax.config import model_from_file
  from lckv_jax.serve import group_sizes
  from lckv_jax.serve.__main__ import lowered, prefill_rows_that_fit, rows_that_fit
  assert group_sizes(8) == [8, 4, 2, 1] and group_sizes(6) == [4, 2, 1] and group_sizes(1) == [1]
  cap, slots = 25_507_659_776, 1024
  chosen = {}
  for shape in ("7b", "1b"):
    for layer_types in ("llama", "lckv"):
      cfg = model_from_file(config_path(shape), layer_types=layer_types, dtype="bfloat16",
                            param_dtype="bfloat16")
      weights = 2 * roofline.param_count(cfg)
      fit = lambda k: rows_that_fit(cfg, cap, weights, slots, None, 256 * k, k)  # noqa: E731
      k = prefill_rows_that_fit(8, fit)
      assert k == 1 or 16 * fit(k) >= 15 * fit(1)
      assert k == 8 or 16 * fit(2 * k) < 15 * fit(1)
      chosen[shape, layer_types] = k
      if shape == "7b" and layer_types == "llama":  # the server says what jobs of 8 would cost
        assert lowered(8, k, fit) == (f"--prefill_rows 8 lowered to 1: jobs of 8 prompts would "
                                      f"leave {fit(8):,} rows of the {fit(1):,} a job of one "
                                      "leaves (jobs take at most 1/16 of the rows; --max_batch "
                                      "sizes the batch by hand)")
  assert chosen[("7b", "llama")] == 1 and chosen[("7b", "lckv")] > 1
  assert chosen[("1b", "llama")] == chosen[("1b", "lckv")] == 8
