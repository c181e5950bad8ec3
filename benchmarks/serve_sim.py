"""The server's scheduling on a virtual clock: what a setting's batch occupancy and tokens/s
would be, predicted from measured call costs, with no accelerator.

The engine (`lckv_jax.serve.engine.Engine`) runs as it does in the server: admission, prefill
jobs, the per-tick budget, decode ticks, freeing rows. Only its calls are stand-ins
(`FakeGenerator`): each advances a virtual clock by a cost (`Costs`) and moves the rows' counts
as the real calls would (every request runs to its `max_tokens`). A burst of requests drawn from
the load mix of `benchmarks.serve_load` is served to the end; the result is the steady state as
serve_load reads it (`serve_load.steady_window`: from the end of the first fill to the last moment
requests waited).

  python -m benchmarks.serve_sim --max_batch 5082 --prefill_rows 32 [--steps_per_tick 8] \\
      [--busy_steps_per_tick 16] [--prefill_tokens_per_tick N] [--burst 4] \\
      [--costs 1b-lckv-h200] [--call_ms ...]

It answers what the scheduling decides: how many rows run, how much of a tick is prefill, how
many slots padding takes. How fast the calls are is its input, not its output: the costs are fits
to a few H200 measurements (`COSTS`), so its tokens/s are a prediction to check with serve_load,
not a measurement. Checked: at b829c8c (1b lckv, 5,082 rows, 16 steps a tick, 32 prefill rows,
65,536 tokens a tick charged at whole chunks; that commit's engine with the costs then) it
predicted 18,167 steady tokens/s and 2,624 running rows in the steady state, against 17,532
tokens/s, a peak of 2,888 running rows and 2,145 on average over the whole burst, measured. With
the costs refitted to the server's calls and its hand-out (`COSTS`), a405070's 1b lckv setting
(chunks of 512 in 8 widths, jobs of 16; that engine handed tokens out before dispatching the
next calls, simulated with each call run at once) is predicted at 19,815 steady tokens/s and
4,771 running rows, against 19,844 and 4,820 measured in a steady window cut on tick edges.
Both checks simulate the runs' bursts of 2.4 x rows (`--burst 2.4`); the default, 4 x rows, gives
a window in which the rows turn over about twice (`steady_turnovers`), where 2.4 x rows at 1b
LCKV gives a third of a turnover and reads one phase of the batch's swings (about 8% low there).

Device calls queue as JAX dispatches them: the host goes on until the engine fetches a result,
so host work between a dispatch and its fetch (the hand-out the engine defers past the next
prefill dispatch) overlaps the device's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import NamedTuple

import numpy as np

from benchmarks.serve_load import steady_detail, steady_window
from lckv_jax.generation import PrefillJob, chunked_length
from lckv_jax.sampling import Sampling
from lckv_jax.serve import PREFILL_CHUNK, PREFILL_ROWS, STEPS_PER_TICK
from lckv_jax.serve.engine import Engine, Request


@dataclasses.dataclass(frozen=True)
class Costs:
  """Seconds each stand-in call takes."""
  call: float  # a prefill call, whatever its size (weights read once an iteration, launches)
  slot: float  # and per slot it prefills (rows x width, padding included)
  step: float  # a decode step, whatever the batch
  row: float  # and per row of the batch (a free row costs as much as a running one)
  host_row: float  # the engine's hand-out, per request it hands tokens (or its end) to
  host_request: float = 50e-6  # admission (padding a prompt, its job)
  finish: float = 1e-3  # sampling a finished job's first tokens
  insert: float = 1e-3  # its rows into the batch
  later_slot: float | None = None  # per slot of a later chunk, which attends the cache (None: slot)


COSTS = {
    # 1b LCKV on the H200, bf16. Prefill, the server's own calls timed one by one (a probe at
    # 038251b): first chunks [32, 64] 65.4 ms, [32, 128] 117.2, [32, 256] 230.5, [64, 256] 460.1
    # (call + slot x slots through them), later chunks [32, 256] 264.4 and [64, 256] 522.5 (the
    # chunk attends the cache before it: later_slot). Decode: 1.33 ms a step at 32 rows and
    # 39.2 ms at 4,830 (throughput_h200.json): step + row x rows. Host: the hand-out (emit) in
    # the steady window of the a405070 burst, 9.9% of a 3.9 s tick for about 5,400 requests
    # handed tokens a tick (4,820 running, the ~280 refilled and the ~280 ended), 71 us each: the
    # engine's thread shares the GIL with the HTTP thread that streams to them. With the device
    # calls made synchronous (that engine handed out before it dispatched), the a405070 setting
    # (chunks of 512, 8 widths, jobs of 16) is predicted at 19,815 steady tokens/s against 19,844
    # measured, and 038251b's (chunks of 256, jobs of 32) at 18,879.
    "1b-lckv-h200": Costs(call=9e-3, slot=27.5e-6, later_slot=31.2e-6, step=1.3e-3, row=7.9e-6,
                          host_row=71e-6),
    # 7b LCKV on the H200, bf16. Prefill: a [4, 256] chunk 174 ms, [15, 512] whole prompts
    # 1,146 ms (the offline max batch's 12.6 s in 11 calls). Decode: 22.6 ms a step at 158 rows,
    # and about 4.5 ms for the weights alone (13.5 GB at the measured 3.2 TB/s). At b829c8c
    # (198 rows, 4 prefill rows) it predicts 2,748 and 2,881 tokens/s at 8 and 16 steps a tick
    # (today's engine), against 2,844 and 2,982 measured: 3% low, and the same 5% gain from the
    # longer tick.
    "7b-lckv-h200": Costs(call=24.5e-3, slot=146e-6, step=4.5e-3, row=0.114e-3, host_row=18e-6),
}


class _State(NamedTuple):
  """What the engine reads of a `DecodeState`: tokens, counts and done flags (host arrays)."""
  tokens: np.ndarray
  num_generated: np.ndarray
  done: np.ndarray
  max_new: np.ndarray


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


class FakeGenerator:
  """`Generator`'s calls as the engine makes them, each costing `costs` on `clock`."""

  def __init__(self, costs: Costs, clock: Clock, max_tokens: int, chunk: int | None,
               widths: int | None = None):
    self.costs, self.clock, self.max_tokens, self.chunk = costs, clock, max_tokens, chunk
    self.widths = widths
    self.busy_until = 0.0  # the device's queue: calls run in order, after the host dispatched

  def _run(self, seconds: float) -> None:
    """A device call: dispatched now, run after the calls before it (the host goes on, as with
    JAX's asynchronous dispatch, until the engine fetches a result: `SimulatedEngine._fetch`)."""
    self.busy_until = max(self.busy_until, self.clock.now) + seconds

  def begin(self, prompts, max_new_tokens, sampling, seeds, pad_to=None) -> PrefillJob:
    self.clock.now += self.costs.host_request
    n = len(prompts[0])
    padded = pad_to or chunked_length(n, self.chunk, self.widths)
    zeros = np.zeros((1, padded), np.int32)
    return PrefillJob(tokens=zeros, positions=zeros, segment_ids=zeros, lengths=np.array([n]),
                      budget=np.array([max_new_tokens]), chunk=self.chunk or padded, seed=0,
                      sampling=tuple(sampling), seeds=tuple(seeds))

  def prefill_next(self, job: PrefillJob) -> PrefillJob:
    start, end = job.bounds(job.chunks_done)
    slot = self.costs.slot if start == 0 else (self.costs.later_slot or self.costs.slot)
    self._run(self.costs.call + slot * job.tokens.shape[0] * (end - start))
    return dataclasses.replace(job, chunks_done=job.chunks_done + 1)

  def finish(self, job: PrefillJob) -> _State:
    self._run(self.costs.finish)
    rows = job.tokens.shape[0]
    ones = np.ones(rows, np.int32)  # the first token, sampled from the prefill's logits
    return _State(np.ones((rows, self.max_tokens), np.int32), ones, ones >= job.budget,
                  job.budget.astype(np.int32))

  def insert_rows(self, state: _State, rows, new: _State) -> _State:
    self._run(self.costs.insert)
    kept = [i for i, r in enumerate(rows) if r is not None]
    into = [rows[i] for i in kept]
    for f in ("num_generated", "done", "max_new"):
      getattr(state, f)[into] = getattr(new, f)[kept]
    return state

  def free_rows(self, batch: int) -> _State:
    return _State(np.ones((batch, self.max_tokens), np.int32), np.zeros(batch, np.int32),
                  np.ones(batch, bool), np.zeros(batch, np.int32))

  def decode(self, state: _State, num_steps: int) -> _State:
    batch = state.done.shape[0]
    self._run(num_steps * (self.costs.step + self.costs.row * batch))
    grown = np.minimum(state.num_generated + num_steps, state.max_new)
    counts = np.where(state.done, state.num_generated, grown)
    return state._replace(num_generated=counts, done=state.done | (counts >= state.max_new))


class SimulatedEngine(Engine):
  """The engine's scheduling over `FakeGenerator`, on a virtual clock."""

  def __init__(self, costs: Costs, **engine_args):
    self.clock = Clock()
    self._costs = costs
    super().__init__(_Model, **engine_args)
    self._reset()

  def _fetch(self):  # waits for the device's queue, as `jax.device_get` does
    self.clock.now = max(self.clock.now, self.gen.busy_until)
    return super()._fetch()

  def _generator(self, model, **kw) -> FakeGenerator:
    return FakeGenerator(self._costs, self.clock, self.max_tokens, self.prefill_chunk,
                         self.prefill_widths)


class _Model:  # what the engine reads of a model
  class config:
    max_position_embeddings = 1 << 30


def simulate(costs: Costs, max_batch: int, *, steps_per_tick: int = STEPS_PER_TICK,
             busy_steps_per_tick: int | None = None,
             prefill_rows: int = PREFILL_ROWS, prefill_tokens_per_tick: int | None = None,
             admit_lookahead: int | None = None, prefill_chunk: int | None = PREFILL_CHUNK,
             prefill_widths: int | None = None, burst: float = 4.0, prompt=(32, 512),
             output=(32, 512), seed: int = 7) -> dict:
  """Serves a burst of `burst` x `max_batch` requests (prompt and output lengths uniform in
  `prompt` and `output`) to the end; returns the steady state and what the engine did."""
  engine = SimulatedEngine(
      costs, max_batch=max_batch, max_prompt=prompt[1], max_tokens=output[1],
      steps_per_tick=steps_per_tick, busy_steps_per_tick=busy_steps_per_tick,
      max_waiting=1 << 62, prefill_chunk=prefill_chunk, prefill_widths=prefill_widths,
      prefill_tokens_per_tick=prefill_tokens_per_tick, prefill_rows=prefill_rows,
      admit_lookahead=admit_lookahead)
  rng = np.random.RandomState(seed)
  ends, slots, budgets = [], [], []
  for i in range(round(burst * max_batch)):
    n, new = rng.randint(prompt[0], prompt[1] + 1), rng.randint(output[0], output[1] + 1)
    slots.append(chunked_length(n, engine.prefill_chunk, prefill_widths) if
                 engine.prefill_chunk else n)
    budgets.append(int(new))

    def emit(tokens, reason):  # in the engine's hand-out (`_collect`), on its thread
      engine.clock.now += costs.host_row
      if reason is not None:
        ends.append(engine.clock())
    engine.submit(Request([1] * n, int(new), Sampling(temperature=1.0), i, emit, arrival=0.0))
  samples = []  # after each tick, what serve_load reads from /metrics
  while engine.tick():
    s = engine.stats
    samples.append((engine.clock(), {"lckv_queue_length": engine._num_waiting(),
                                     "lckv_generated_tokens_total": s.tokens_generated,
                                     "lckv_decode_ticks_total": s.decode_ticks,
                                     "lckv_running_rows": s.running}))
  inside = steady_window(samples, ends, max_batch)
  if not inside:
    raise ValueError(f"simulate: no steady state (a burst of {burst} x {max_batch} rows never "
                     "kept requests waiting after the first fill): give a larger --burst")
  (t0, a), (t1, b) = inside[0], inside[-1]
  tokens = b["lckv_generated_tokens_total"] - a["lckv_generated_tokens_total"]
  seconds = engine.stats.seconds
  total = sum(seconds.values())
  return dict(
      max_batch=max_batch, steps_per_tick=steps_per_tick,
      busy_steps_per_tick=engine.busy_steps_per_tick, prefill_rows=engine.prefill_rows,
      prefill_chunk=engine.prefill_chunk, prefill_widths=prefill_widths,
      prefill_tokens_per_tick=engine.prefill_tokens_per_tick, steady_s=round(t1 - t0, 2),
      steady_tokens_per_s=round(tokens / (t1 - t0), 1),
      **steady_detail(samples, ends, max_batch),  # its mean running rows and their turnovers
      tick_s=round((t1 - t0) / (len(inside) - 1), 3), prompt_slots=round(float(np.mean(slots)), 1),
      engine_share={k: round(v / total, 4) for k, v in seconds.items()},
      requests=len(ends), tokens=engine.stats.tokens_generated, requested_tokens=sum(budgets),
      costs=dataclasses.asdict(costs))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--max_batch", type=int, required=True)
  p.add_argument("--steps_per_tick", type=int, default=STEPS_PER_TICK)
  p.add_argument("--busy_steps_per_tick", type=int, default=None,
                 help="default: the server's (twice --steps_per_tick)")
  p.add_argument("--prefill_rows", type=int, default=PREFILL_ROWS)
  p.add_argument("--prefill_tokens_per_tick", type=int, default=None,
                 help="default: the server's (serve.prefill_budget)")
  p.add_argument("--admit_lookahead", type=int, default=None)
  p.add_argument("--prefill_chunk", type=int, default=PREFILL_CHUNK)
  p.add_argument("--prefill_widths", type=int, default=None)
  p.add_argument("--burst", type=float, default=4.0,
                 help="requests, in multiples of the rows (default 4: the steady window then sees "
                 "the rows turn over about twice; 2.4 as the 1b records' runs)")
  p.add_argument("--prompt", type=int, nargs=2, default=[32, 512])
  p.add_argument("--output", type=int, nargs=2, default=[32, 512])
  p.add_argument("--costs", choices=sorted(COSTS), default="1b-lckv-h200")
  for f in dataclasses.fields(Costs):
    p.add_argument(f"--{f.name}_ms", type=float, default=None,
                   help=f"override the preset's {f.name} (milliseconds)")
  a = p.parse_args(argv)
  costs = dataclasses.replace(COSTS[a.costs], **{
      f.name: getattr(a, f"{f.name}_ms") / 1e3 for f in dataclasses.fields(Costs)
      if getattr(a, f"{f.name}_ms") is not None})
  result = simulate(costs, a.max_batch, steps_per_tick=a.steps_per_tick,
                    busy_steps_per_tick=a.busy_steps_per_tick, prefill_rows=a.prefill_rows,
                    prefill_tokens_per_tick=a.prefill_tokens_per_tick,
                    admit_lookahead=a.admit_lookahead, prefill_chunk=a.prefill_chunk,
                    prefill_widths=a.prefill_widths, burst=a.burst, prompt=tuple(a.prompt),
                    output=tuple(a.output))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
