"""Continuous batching (lckv_jax/serve/engine.py): requests joining and leaving a running batch
get exactly the tokens they get alone."""

import threading
import time

import jax
import pytest

from lckv_jax.generation import Generator, generate
from lckv_jax.sampling import Sampling
from lckv_jax.serve.engine import Engine, QueueFull, Request, bucket
from tests.generation_test import prompts


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
  return tiny.tiny_model(std=0.1, layer_types="0_2_2_3", max_position_embeddings=128)


def _engine(model, **kw):
  kw = {"max_batch": 4, "max_prompt": 20, "max_tokens": 12, "steps_per_tick": 3, **kw}
  engine = Engine(model, **kw)
  engine.start()
  return engine


def test_sixteen_requests_through_four_rows_get_their_offline_tokens(model):
  engine = _engine(model)  # started: warmed up, everything it runs is compiled
  compiles = []
  listener = lambda event, seconds, **kw: compiles.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ps = prompts([3, 17, 5, 9, 1, 12, 20, 2, 7, 14, 4, 11, 6, 19, 8, 10], seed=21)
    budgets = [12, 3, 7, 12, 1, 9, 5, 12, 2, 8, 12, 4, 6, 10, 11, 12]
    sinks = [_Sink() for _ in ps]
    for p, n, sink in zip(ps, budgets, sinks):
      engine.submit(Request(p, n, Sampling(), 0, sink))
    for sink in sinks:
      assert sink.done.wait(120)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    engine.stop()
  # Prompts of 1 to 20 tokens, in any row, any number finishing at once: nothing compiled.
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  for p, n, sink in zip(ps, budgets, sinks):
    assert sink.reason == "length"
    assert sink.tokens == generate(model, [p], max_new_tokens=n).tokens[0]
  assert engine.stats.running == 0 and engine.stats.requests_finished == 16
  assert engine.stats.tokens_generated == sum(budgets)


def test_sampled_requests_follow_their_seed_and_cancel_frees_the_row(model):
  engine = _engine(model, max_batch=2, steps_per_tick=1)
  try:
    long, short = _Sink(), _Sink()
    engine.submit(Request(prompts([6], seed=1)[0], 12, Sampling(0.9, 10), 5, long))
    engine.submit(Request(prompts([4], seed=2)[0], 12, Sampling(1.0), 77, short))
    assert short.done.wait(60) and short.reason == "length"
    gen = Generator(model, max_new_tokens=12, max_len=engine.max_len, per_row_sampling=True)
    alone = gen.decode(gen.start([prompts([4], seed=2)[0]], sampling=[Sampling(1.0)],
                                 seeds=[77], pad_to=bucket(4)))
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
