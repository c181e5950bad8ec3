"""benchmarks.serve_sim: the engine's own scheduling on a virtual clock (no model, no device)."""

import json

import pytest

from benchmarks import serve_sim


def test_the_default_budget_keeps_a_large_saturated_batch_full(capsys):
  # 1,024 rows and 16 steps a busy tick (the default, twice 8) free about 60 rows a tick (outputs
  # of 272 tokens on average), about 19,000 prompt slots: a fixed 8,192 refills under half of
  # them, so under load most rows wait for their prefill while every decode step computes them.
  # The default budget (twice a full busy tick's tokens, 32,768 here) keeps the batch full.
  costs = serve_sim.COSTS["1b-lckv-h200"]
  kw = dict(steps_per_tick=8, prefill_rows=16, burst=3.0)
  fixed = serve_sim.simulate(costs, 1024, prefill_tokens_per_tick=8192, **kw)
  default = serve_sim.simulate(costs, 1024, **kw)
  assert default["prefill_tokens_per_tick"] == 32768 and default["busy_steps_per_tick"] == 16
  assert fixed["steady_running"] < 0.6 * 1024 < 0.9 * 1024 < default["steady_running"]
  assert default["steady_tokens_per_s"] > fixed["steady_tokens_per_s"]
  for r in (fixed, default):  # every request ran to its budget, through the engine's counts
    assert r["requests"] == 3072 and r["tokens"] == r["requested_tokens"]
    assert abs(sum(r["engine_share"].values()) - 1) < 1e-3
  # Chunks of 256 after a first of 64, 128 or 256 tokens: 319 slots for prompts of 32-512.
  assert 300 < default["prompt_slots"] < 340


def test_the_command_line_prints_one_result(capsys):
  serve_sim.main(["--max_batch", "64", "--prefill_rows", "4", "--burst", "3", "--call_ms", "5"])
  out = json.loads(capsys.readouterr().out)
  assert out["max_batch"] == 64 and out["costs"]["call"] == pytest.approx(5e-3)
  assert out["steady_tokens_per_s"] > 0 and 0 < out["steady_running"] <= 64


def test_a_burst_that_never_saturates_says_so():
  with pytest.raises(ValueError, match="no steady state"):
    serve_sim.simulate(serve_sim.COSTS["1b-lckv-h200"], 64, burst=0.5)


def test_the_hand_out_runs_while_the_device_prefills(monkeypatch):
  # The engine hands a decode call's tokens out after the next prefill calls are dispatched, so
  # the host's hand-out and the device's prefill overlap; with every call run at once (the host
  # waiting for each, as before the deferral) the same scheduling is slower by the hand-out.
  costs = serve_sim.COSTS["1b-lckv-h200"]
  kw = dict(prefill_rows=16, burst=3.0)
  overlapped = serve_sim.simulate(costs, 1024, **kw)

  def at_once(self, seconds):
    self.clock.now = self.busy_until = max(self.clock.now, self.busy_until) + seconds
  monkeypatch.setattr(serve_sim.FakeGenerator, "_run", at_once)
  serial = serve_sim.simulate(costs, 1024, **kw)
  assert overlapped["tokens"] == overlapped["requested_tokens"]  # no token lost in the deferral
  assert overlapped["steady_tokens_per_s"] > 1.04 * serial["steady_tokens_per_s"]
