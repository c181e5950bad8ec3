"""Load on the OpenAI-compatible server: Poisson arrivals at several rates, mixed prompt and
output lengths; throughput, time to first token and inter-token latency against the rate.

  python -m benchmarks.serve_load --shape=1b --layer_types=lckv --memory_bytes=25507659776 \\
      --rates 1 2 4 8 16 --requests=200
  python -m benchmarks.serve_load --checkpoint=DIR --max_batch=32 --rates 1 4
  python -m benchmarks.serve_load --smoke                      # tiny, on a CPU (CI)
  python -m benchmarks.serve_load --plot benchmarks/results/serve_load_h200.json \
      --out benchmarks/results/serve_load_h200.png              # the figure of a record file

It starts `python -m lckv_jax.serve` (random bf16 weights of configs/<shape>.py, saved to a
temporary folder, or --checkpoint) and drives it with streaming requests from `--clients` asyncio
processes (one falls behind a GPU server's hundreds of streams; `client_cpu` in each result is
the busiest one's CPU share): each request's time to first token (TTFT) and the gaps between its
streamed chunks (inter-token latency, ITL: the server sends a row's tokens every
`--steps_per_tick` steps, `--busy_steps_per_tick` while requests wait for a row, so a gap spans up
to that many tokens) are measured at the client, and
its time per output token (TPOT: first to last token over the tokens after the first, counted by
the stream's usage chunk). Per rate: requests/s and output tokens/s achieved, TTFT, ITL and TPOT
p50/p99, rejected requests (429) and failed ones (a broken connection, by error), the mean and
peak of the rows decoding, and the engine loop's seconds by phase (`engine_share`: what bound the
server). The server's admitted batch (its max_batch) is in the record. The clients hold at most
`--max_open` requests open (twice the rows by default: a saturated server still has a batch of
them waiting); a request's TTFT counts from its arrival, its wait for a connection included. A
point that fails ends the sweep, and the points before it are written (`incomplete` says why).

`sustained_rate` reads a sweep as a serving team does: the highest arrival rate the server keeps
up with (every request served, the rate within the server's capacity) while the p99 TTFT stays
under a limit (`TTFT_P99_LIMIT_S`, 2 s by default: an interactive client's patience).

Saturation: `--burst K` ends the sweep with K x rows requests arriving at once, so that requests
wait for rows for most of the run. During every run the client reads the server's /metrics every
`METRICS_EVERY_S`; the tokens the server generated while every row was taken, over that time,
are the run's `full_tokens_per_s`, the server's throughput with a full batch (a burst's window
opens with every row prefilling at once). A burst's `steady_tokens_per_s` is the saturated
server's steady state: the tokens generated from the end of its first fill (once as many requests
have finished as there are rows) to the last sample that saw requests waiting (every freed row
refilled at the next tick). The window needs the rows to turn over about once or more in it
(`steady_turnovers`; a warning says when they did not): a burst's rows start together, so the
rate at which they free swings for a few turnovers (simulated, `benchmarks.serve_sim`: at 1b
LCKV a burst of 2.4 x rows gives a third of a turnover, 4 x rows two). The client's own
tokens/s over the whole run also counts the fill and the ramp-down, when the last requests
finish on an emptying batch. `--duration D` sends rate x D requests per rate instead of
`--requests`, so that low rates take no longer than high ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import records
from benchmarks.common import ROOT, cap_allocator, command, config_path, default_out
from lckv_jax.serve import PREFILL_CHUNK, PREFILL_TOKENS_PER_TICK, STEPS_PER_TICK


TTFT_P99_LIMIT_S = 2.0
DEFAULT_PROMPT, DEFAULT_OUTPUT = [32, 512], [32, 512]  # tokens, uniform: the load mix
METRICS_EVERY_S = 0.25
MIN_TURNOVERS = 1.0  # a burst's steady window shorter than this many turnovers: a warning
FULL_MIN_S = 1.0  # seconds of full batch below which a run's full_tokens_per_s is not used


def sustained_rate(results: list[dict], ttft_p99_limit_s: float = TTFT_P99_LIMIT_S
                   ) -> dict | None:
  """The result of the highest rate kept up with under the TTFT limit (None if none was): all
  requests served (none rejected or failed), p99 TTFT <= the limit, and the rate within the
  server's capacity: at most the requests/s of the burst (`--burst`: the server saturated), or
  without a burst, achieved requests/s at least 90% of the rate. (A run of a few seconds of
  arrivals ends with its last requests' decoding, so its achieved rate reads low even when the
  server keeps up: the burst is the capacity.)"""
  bursts = [r["requests_per_s"] for r in results if r["rate"] is None]
  within = ((lambda r: r["rate"] <= max(bursts)) if bursts else
            (lambda r: r["requests_per_s"] >= 0.9 * r["rate"]))
  ok = [r for r in results
        if r["rate"] is not None and r["rejected"] == 0 and not r.get("failed") and within(r)
        and r["ttft_p99_s"] is not None and r["ttft_p99_s"] <= ttft_p99_limit_s]
  return max(ok, key=lambda r: r["rate"], default=None)


def full_batch_tokens_per_s(results: list[dict]) -> float | None:
  """The server's tokens/s with every row taken (the best run that kept the batch full for
  `FULL_MIN_S`), or None."""
  full = [r["full_tokens_per_s"] for r in results
          if r.get("full_tokens_per_s") and r.get("full_s", 0) >= FULL_MIN_S]
  return max(full) if full else None


def steady_burst(results: list[dict]) -> dict | None:
  """The last burst whose steady state (`steady_state`) lasted `FULL_MIN_S`, or None."""
  steady = [r for r in results if r["rate"] is None and r.get("steady_tokens_per_s")
            and r.get("steady_s", 0) >= FULL_MIN_S]
  return steady[-1] if steady else None


def saturated_tokens_per_s(results: list[dict]) -> float:
  """What the server does when saturated: its steady tokens/s in a burst where measured, else
  the best of its full-batch tokens/s and the client's output tokens/s over a run (the burst's:
  requests waiting for rows most of the run; both windows include the first fill, so both are
  lower bounds)."""
  steady = steady_burst(results)
  if steady is not None:
    return steady["steady_tokens_per_s"]
  return max([full_batch_tokens_per_s(results) or 0.0]
             + [r["output_tokens_per_s"] for r in results])


def _steps(entry: dict) -> str:
  """An entry's decode steps a tick, with those of a busy tick (requests waiting) where it
  recorded them: '8 (16)'; records from before busy ticks ran every tick alike: '8'."""
  steps, busy = entry.get("steps_per_tick", STEPS_PER_TICK), entry.get("busy_steps_per_tick")
  return f"{steps}" if busy is None else f"{steps} ({busy})"


def _prefill(entry: dict) -> str:
  """An entry's prefill calls, 'rows x chunk (first-chunk widths)': '32 x 256 (3)'; 'whole' for
  prompts prefilled at once. Records from before the chunk was read from the server ran the
  default of then, 256 tokens in three first-chunk widths."""
  chunk = entry.get("prefill_chunk")
  rows = entry.get("prefill_rows", 1)
  if chunk == 0:
    return f"{rows} x whole"
  chunk = int(chunk or PREFILL_CHUNK)
  from lckv_jax.generation import first_chunk_sizes  # jax, only for tables of old records
  return f"{rows} x {chunk} ({entry.get('prefill_widths') or len(first_chunk_sizes(chunk))})"


def _mix(entry: dict) -> str:
  """An entry's load mix, 'prompts / outputs' in tokens (the default where it names none)."""
  return "{}-{} / {}-{}".format(*entry.get("prompt", DEFAULT_PROMPT),
                                *entry.get("output", DEFAULT_OUTPUT))


def markdown(entries: list[dict], offline: dict[str, float] | None = None) -> str:
  """One row per served model: its rows, the sustained rate (the highest kept up with, p99 TTFT
  within the entry's limit) with its latencies, and the saturated output tokens/s; with
  `offline` (an entry's setting -> the offline max-batch tokens/s of the same model and memory,
  `benchmarks.throughput`), that number and the saturated one's fraction of it."""
  head = ["model", "cache", "prompt / output tokens", "rows", "prefill rows x chunk (widths)",
          "steps a tick (busy)",
          "prefill tokens a tick", "sustained req/s",
          "TTFT p50 / p99 (s)",
          "inter-token p50 / p99 (ms)", "burst req/s", "burst engine: decode / prefill / host",
          "burst steady tok/s (s)", "saturated output tok/s"]
  if offline is not None:
    head += ["offline max batch tok/s", "saturated / offline"]
  head.append("code")
  rows = []
  for e in entries:
    s = sustained_rate(e["results"], e.get("ttft_p99_limit_s", TTFT_P99_LIMIT_S))
    at = ([f"{s['rate']:g}", f"{s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f}",
           f"{1e3 * s['itl_p50_s']:.1f} / {1e3 * s['itl_p99_s']:.1f}"] if s else ["none", "–", "–"])
    saturated = saturated_tokens_per_s(e["results"])
    bursts = [r for r in e["results"] if r["rate"] is None]
    burst = f"{bursts[-1]['requests_per_s']:.2f}" if bursts else "–"
    share = bursts[-1].get("engine_share") if bursts else None
    where = "–" if not share else " / ".join(
        f"{100 * v:.0f}%" for v in (share["decode"], share["prefill"],
                                    share["admit"] + share["emit"]))
    steady = steady_burst(e["results"])
    steady = "–" if steady is None else (
        f"{steady['steady_tokens_per_s']:,.0f} ({steady['steady_s']:.0f}"
        + (f"; {steady['steady_running']:,.0f} rows" if "steady_running" in steady else "")
        + (f"; {steady['steady_turnovers']:.1f} turnovers" if "steady_turnovers" in steady
           else "") + ")")
    rows.append([e["label"], e.get("cache_dtype") or "bf16", _mix(e), f"{e['max_batch']:,}",
                 _prefill(e), _steps(e),
                 # Records before the budget was in them ran the default of then, 8,192.
                 f"{e.get('prefill_tokens_per_tick') or PREFILL_TOKENS_PER_TICK:,}",
                 *at, burst, where, steady, f"{saturated:,.0f}"])
    if offline is not None:
      ref = offline.get(e["setting"])
      rows[-1] += [f"{ref:,.0f}", f"{saturated / ref:.2f}"] if ref else ["–", "–"]
    rows[-1].append(e.get("code", "–"))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot(entries: list[dict], out: str, title: str = "") -> str:
  """Output tokens/s and p99 TTFT against the arrival rate, one line per served model; the
  burst (saturation) is the star at its achieved requests/s, with its saturated tokens/s (its
  TTFT is queueing by design, so it is left out on the right)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
  for e in entries:
    rs = sorted((r for r in e["results"] if r["rate"] is not None), key=lambda r: r["rate"])
    x = [r["rate"] for r in rs]
    mix = "" if _mix(e) == _mix({}) else " " + _mix(e)
    cache = f" {e['cache_dtype']}" if e.get("cache_dtype") else ""
    default = e.get("steps_per_tick", STEPS_PER_TICK) == STEPS_PER_TICK and e.get(
        "busy_steps_per_tick") in (None, 2 * STEPS_PER_TICK)
    more = "" if default else f", {_steps(e)} steps a tick"
    label = f"{e['label']}{cache}{mix} (batch {e['max_batch']}{more})"
    y = [r["output_tokens_per_s"] for r in rs]
    bursts = [r for r in e["results"] if r["rate"] is None]
    line, = a.plot(x, y, "o-", label=label)
    if bursts:
      a.plot(x[-1:] + [bursts[-1]["requests_per_s"]],
             y[-1:] + [saturated_tokens_per_s(e["results"])], ":", color=line.get_color())
      a.plot([bursts[-1]["requests_per_s"]], [saturated_tokens_per_s(e["results"])], "*",
             ms=11, color=line.get_color())
    b.plot(x, [r["ttft_p99_s"] for r in rs], "o-", label=label, color=line.get_color())
  for ax in (a, b):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("arrival rate (requests/s)")
    ax.grid(alpha=0.3)
  a.set_ylabel("output tokens/s\n(star: saturated, at the burst's requests/s)")
  b.set_ylabel("time to first token, p99 (s)")
  b.set_yscale("log")
  b.axhline(TTFT_P99_LIMIT_S, color="gray", ls="--", lw=0.8)
  a.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=130)
  plt.close(fig)
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(checkpoint: str, flags: list[str], timeout: float = 900, env=None,
                 log_path: str | None = None, say_every: float | None = None):
  """`python -m lckv_jax.serve` in a subprocess, once /health answers: (process, url).

  Its output goes to a file (`log_path`, else a temporary one), not a pipe nobody reads (a full
  pipe would stall the server), and ends the error if it exits during start-up or does not
  start in `timeout` s. Every `say_every` s of waiting prints the log's last line (a start that
  hangs says where).
  """
  import httpx
  port = _free_port()
  log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")
  proc = subprocess.Popen([sys.executable, "-m", "lckv_jax.serve", f"--checkpoint={checkpoint}",
                           f"--port={port}", *flags], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, text=True, env=env)
  url = f"http://127.0.0.1:{port}"
  t0 = time.monotonic()
  said = t0

  def tail() -> str:
    log.seek(0)
    return log.read()[-3000:]

  while time.monotonic() < t0 + timeout:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited {proc.returncode}: {tail()}")
    try:
      if httpx.get(url + "/health", timeout=1).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      time.sleep(0.2)
    if say_every and time.monotonic() - said >= say_every:
      said = time.monotonic()
      last = (tail().strip().splitlines() or ["(nothing yet)"])[-1][:200]
      print(f"  waiting for the server: {said - t0:.0f} s; its log: {last}", flush=True)
  proc.kill()
  raise RuntimeError(f"the server did not start in {timeout} s: {tail()}")


async def _one(client, url: str, prompt: list[int], max_tokens: int, seed: int,
               slots: asyncio.Semaphore | None = None) -> dict:
  """One streaming request: its TTFT, inter-token gaps and tokens (or its HTTP error, or the
  transport error that broke it). Times are `time.monotonic()` (CLOCK_MONOTONIC: one clock across
  the client processes); the clock starts at the request's arrival, before it waits for one of
  `slots` (the client's open connections), so a capped client's wait counts in its TTFT."""
  import httpx
  t0 = time.monotonic()
  stamps = []
  body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
          "stream": True, "stream_options": {"include_usage": True}}
  last = ""
  async with slots or contextlib.nullcontext():
    try:
      async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
          await r.aread()
          return dict(status=r.status_code)
        async for line in r.aiter_lines():
          if line.startswith("data: ") and line != "data: [DONE]":
            stamps.append(time.monotonic())
            last = line
    except httpx.TransportError as e:
      # A dropped or refused connection (seen once in a burst of 20,384 streams) fails this
      # request, not the run: it is counted, by its error's name, beside the served ones.
      return dict(status=0, error=type(e).__name__, chunks=len(stamps))
    if '"usage"' not in last:  # the stream ended before its usage chunk: cut short
      return dict(status=0, error="IncompleteStream", chunks=len(stamps))
  # The last chunk holds the token count, not tokens (a request can stop at an EOS early).
  stamps.pop()
  tokens = json.loads(last[len("data: "):])["usage"]["completion_tokens"]
  return dict(status=200, ttft=stamps[0] - t0 if stamps else None,
              itl=list(np.diff(stamps)) if len(stamps) > 1 else [], tokens=tokens,
              tpot=(stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 and stamps else None,
              end=stamps[-1] if stamps else time.monotonic())


def arrivals(rate: float | None, n: int, prompt_range, output_range, vocab: int, seed: int
             ) -> list[tuple[float, list[int], int, int]]:
  """`n` requests of a Poisson process of `rate` per second (None: all at once): (seconds after
  the start, prompt ids, max_tokens, seed) each."""
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(1.0 / rate, n) if rate else np.zeros(n)
  at = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
  prompts = [rng.integers(1, vocab, int(rng.integers(*prompt_range))).tolist() for _ in range(n)]
  outputs = [int(rng.integers(*output_range)) for _ in range(n)]
  return [(float(at[i]), prompts[i], outputs[i], seed + i) for i in range(n)]


async def _drive(url: str, items: list, start: float, max_open: int | None = None
                 ) -> tuple[list[dict], float]:
  """Sends `items` (`arrivals`) at `start` + their offsets (monotonic seconds), at most
  `max_open` at a time (None: all), and waits for them: their results, and this process's CPU
  seconds meanwhile."""
  import httpx
  cpu = time.process_time()
  limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
  slots = asyncio.Semaphore(max_open) if max_open else None
  async with httpx.AsyncClient(timeout=None, limits=limits) as client:
    tasks = []
    for offset, prompt, max_tokens, seed in items:
      delay = start + offset - time.monotonic()
      if delay > 0:
        await asyncio.sleep(delay)
      tasks.append(asyncio.create_task(_one(client, url, prompt, max_tokens, seed, slots)))
    done = await asyncio.gather(*tasks)
  return done, time.process_time() - cpu


def _client(url: str, items: list, start: float, max_open: int | None
            ) -> tuple[list[dict], float]:
  """`_drive` in a client process of the pool (`Clients`)."""
  return asyncio.run(_drive(url, items, start, max_open))


def _ready(_=None) -> int:
  return os.getpid()


class Clients:
  """The processes that send a run's requests. One asyncio process parsing hundreds of streams
  of server-sent events can fall behind a GPU server, and a late reader reads as a slow server
  (later tokens, longer gaps, later arrivals); each process takes every k-th request. The
  superposition of k Poisson processes of rate r/k is one of rate r, so the arrivals are the
  same. `clients=1` sends from the calling process (no pool)."""

  def __init__(self, clients: int):
    import multiprocessing
    self.n = clients
    self.pool = None
    if clients > 1:  # spawned: a forked child would inherit the parent's threads
      self.pool = multiprocessing.get_context("spawn").Pool(clients)
      self.pool.map(_ready, range(clients))  # every process up and importing before a run

  async def run(self, url: str, items: list, max_open: int | None = None
                ) -> tuple[list[dict], list[float], float]:
    """Each request's result (in `items`' order), each client's CPU seconds, the start. At most
    `max_open` requests are open at a time, across the processes (None: no limit)."""
    if self.pool is None:
      start = time.monotonic()
      done, cpu = await _drive(url, items, start, max_open)
      return done, [cpu], start
    start = time.monotonic() + 0.2  # every process has it before the first arrival is due
    parts = [items[i::self.n] for i in range(self.n)]
    each = -(-max_open // self.n) if max_open else None
    job = self.pool.starmap_async(_client, [(url, part, start, each) for part in parts])
    outs = await asyncio.get_running_loop().run_in_executor(None, job.get)
    done = [None] * len(items)
    for i, (results, _) in enumerate(outs):
      done[i::self.n] = results
    return done, [cpu for _, cpu in outs], start

  def close(self) -> None:
    if self.pool is not None:
      self.pool.close()
      self.pool.join()


def _scrape(text: str) -> dict[str, float]:
  """The samples of a Prometheus text page that have no labels: {name: value}."""
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#") and "{" not in line:
      name, value = line.split()[:2]
      out[name] = float(value)
  return out


def engine_phases(text: str) -> dict[str, float]:
  """The engine loop's seconds by phase (`lckv_engine_seconds_total{phase=...}`) of a /metrics
  page."""
  out = {}
  for line in text.splitlines():
    if line.startswith('lckv_engine_seconds_total{phase="'):
      label, value = line.split()[:2]
      out[label.split('"')[1]] = float(value)
  return out


def phase_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
  """Each phase's share of the engine's time between two `engine_phases` readings: what bound
  the run (decode and prefill: the GPU, with their dispatch; admit and emit: the host)."""
  spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
  total = sum(spent.values())
  return {k: round(v / total, 4) for k, v in spent.items()} if total > 0 else {}


def host_use(before: tuple[float, str], after: tuple[float, str]) -> dict[str, float]:
  """From two (monotonic seconds, /metrics page) readings: `server_cpu`, the server process's
  CPU seconds per second (all its threads: the engine's, the HTTP loop's, the runtime's), and
  `engine_cpu`, the engine thread's CPU seconds per second it was not idle (below 1, it waited:
  on the device, or for the GIL)."""
  (t0, a), (t1, b) = before, after
  ga, gb = _scrape(a), _scrape(b)
  busy = sum(v for k, v in engine_phases(b).items() if k != "idle") - sum(
      v for k, v in engine_phases(a).items() if k != "idle")
  cpu = lambda g, k: g.get(k, 0.0)  # noqa: E731
  out = {}
  if t1 > t0 and "process_cpu_seconds_total" in gb:
    out["server_cpu"] = round((cpu(gb, "process_cpu_seconds_total")
                               - cpu(ga, "process_cpu_seconds_total")) / (t1 - t0), 3)
  if busy > 0:
    out["engine_cpu"] = round((cpu(gb, "lckv_engine_cpu_seconds_total")
                               - cpu(ga, "lckv_engine_cpu_seconds_total")) / busy, 3)
  return out


def _full(m: dict) -> bool:
  """Every row taken (decoding or being prefilled), by one /metrics sample. Requests waiting is
  not the test: they wait for the next tick even while rows are free."""
  rows = m.get("lckv_max_batch", 0)
  return rows > 0 and m.get("lckv_running_rows", 0) + m.get("lckv_prefilling_rows", 0) >= rows


def full_batch(samples: list[tuple[float, dict]]) -> tuple[float, float]:
  """(seconds, tokens/s) over the intervals between two /metrics samples that both saw every row
  taken: the server's full-batch throughput."""
  secs = tokens = 0.0
  for (t0, a), (t1, b) in zip(samples, samples[1:]):
    if _full(a) and _full(b):
      secs += t1 - t0
      tokens += b["lckv_generated_tokens_total"] - a["lckv_generated_tokens_total"]
  return secs, (tokens / secs if secs else 0.0)


def steady_window(samples: list[tuple[float, dict]], ends: list[float], rows: int
                  ) -> list[tuple[float, dict]]:
  """The samples of a saturated run's steady state, from /metrics samples and the requests' end
  times (one monotonic clock): from the end of the first fill (the `rows`-th request to finish:
  every row has turned over about once, so the rows' ages are mixed, not all prefilling at once)
  to the last sample that saw requests waiting. Empty where there is no such window of two
  samples or more.

  Where the samples count decode ticks (`lckv_decode_ticks_total`), the window starts and ends on
  the first sample after a tick: its tokens are handed out a tick at a time, so a window of a few
  ticks of seconds each, cut anywhere, could count one tick more or less than its time (the 1b
  LCKV burst at 038251b: 23 s of 4 s ticks read 17,239 tokens/s where the burst as a whole made
  19,332)."""
  waiting = [t for t, m in samples if m.get("lckv_queue_length", 0) > 0]
  if len(ends) <= rows or not waiting:
    return []
  start, stop = sorted(ends)[rows - 1], max(waiting)
  within = [i for i, (t, _) in enumerate(samples) if start <= t <= stop]
  key = "lckv_decode_ticks_total"
  if all(key in m for _, m in samples):  # the first sample after each tick
    within = [i for i in within if i and samples[i][1][key] > samples[i - 1][1][key]]
  inside = samples[within[0]:within[-1] + 1] if within else []
  return inside if len(inside) >= 2 else []


def steady_state(samples: list[tuple[float, dict]], ends: list[float], rows: int
                 ) -> tuple[float, float]:
  """(seconds, tokens/s) of a saturated run's steady state (`steady_window`), or zeros."""
  inside = steady_window(samples, ends, rows)
  if not inside:
    return 0.0, 0.0
  (t0, a), (t1, b) = inside[0], inside[-1]
  key = "lckv_generated_tokens_total"
  return t1 - t0, (b[key] - a[key]) / (t1 - t0)


def turnovers(t0: float, t1: float, ends: list[float], running: float) -> float:
  """The requests that ended between `t0` and `t1`, in multiples of the `running` rows: how many
  times the batch turned over in a window. Under about one the window sees one phase of the
  rows' ages, not their mix: a burst's rows start together and end spread over the output
  lengths, so the rate at which rows free (and prefill work arrives) swings for a few turnovers
  after the first fill. `benchmarks.serve_sim`, 1b LCKV at 5,096 rows: a burst of 2.4 x rows
  gives a window of 0.34 turnovers and reads 21,782 tokens/s, bursts of 4 and 8 give 2.1 and 6.3
  and read 23,695 and 23,665."""
  return round(sum(t0 <= t <= t1 for t in ends) / running, 2) if running else 0.0


def short_window(result: dict, burst: float) -> str | None:
  """A warning for a burst whose steady window covers under `MIN_TURNOVERS` turnovers of its
  rows (`turnovers`): its tokens/s is one phase of the batch's swings, not its steady state."""
  seen = result.get("steady_turnovers")
  if seen is None or seen >= MIN_TURNOVERS:
    return None
  return (f"warning: the burst's steady window saw the rows turn over {seen:g} times (under "
          f"{MIN_TURNOVERS:g}): its {result.get('steady_tokens_per_s', 0):,.0f} tokens/s may be "
          f"off by several percent; a larger --burst (now {burst:g}) gives a longer window")


def steady_detail(samples: list[tuple[float, dict]], ends: list[float], rows: int) -> dict:
  """What the server did inside the steady window: its mean running rows, how many times they
  turned over in it (`turnovers`), and its engine's phase shares (from the samples' `phase`
  entries, `_sample_metrics`)."""
  inside = steady_window(samples, ends, rows)
  if not inside:
    return {}
  running = float(np.mean([m.get("lckv_running_rows", 0) for _, m in inside]))
  out = dict(steady_running=round(running, 1),
             steady_turnovers=turnovers(inside[0][0], inside[-1][0], ends, running))
  first, last = ({k[len("phase "):]: v for k, v in m.items() if k.startswith("phase ")}
                 for m in (inside[0][1], inside[-1][1]))
  if first and last:
    out["steady_engine_share"] = phase_shares(first, last)
  return out


async def _sample_metrics(client, url: str, samples: list, stop: asyncio.Event) -> None:
  while not stop.is_set():
    try:
      r = await client.get(url + "/metrics")
      m = _scrape(r.text)
      m.update({f"phase {k}": v for k, v in engine_phases(r.text).items()})
      samples.append((time.monotonic(), m))
    except Exception:  # noqa: BLE001 - a missed sample only shortens the window
      pass
    try:
      await asyncio.wait_for(stop.wait(), METRICS_EVERY_S)
    except asyncio.TimeoutError:
      pass


async def run_rate(url: str, rate: float | None, n: int, prompt_range, output_range, vocab: int,
                   seed: int, clients: Clients | None = None, max_open: int | None = None
                   ) -> dict:
  """`n` requests arriving as a Poisson process of `rate` per second (None: all at once), sent
  by `clients` (default: this process), at most `max_open` open at a time. A request the server
  refused (an HTTP error: 429 when its queue is full) is `rejected`; one whose connection broke
  is `failed`, counted by its error's name in `errors`."""
  import httpx
  items = arrivals(rate, n, prompt_range, output_range, vocab, seed)
  samples: list = []
  stop = asyncio.Event()
  async with httpx.AsyncClient(timeout=None) as client:
    sampler = asyncio.create_task(_sample_metrics(client, url, samples, stop))
    done, cpu, t0 = await (clients or Clients(1)).run(url, items, max_open)
    wall = max((d.get("end", t0) for d in done), default=t0) - t0
    stop.set()
    await sampler
  full_s, full_tps = full_batch(samples)
  ok = [d for d in done if d["status"] == 200]
  steady = {}
  if rate is None and samples:  # a burst: saturated once its first fill is done
    rows = int(samples[0][1].get("lckv_max_batch", 0))
    secs, tps = steady_state(samples, [d["end"] for d in ok], rows)
    steady = dict(steady_s=round(secs, 2), steady_tokens_per_s=round(tps, 1),
                  **steady_detail(samples, [d["end"] for d in ok], rows))
  ttft = [d["ttft"] for d in ok if d["ttft"] is not None]
  itl = [g for d in ok for g in d["itl"]]
  tpot = [d["tpot"] for d in ok if d.get("tpot") is not None]
  pct = lambda xs, q: round(float(np.percentile(xs, q)), 5) if xs else None  # noqa: E731
  running = [m.get("lckv_running_rows", 0) for _, m in samples]
  broken = [d["error"] for d in done if d["status"] == 0]
  return dict(rate=rate, requests=n, served=len(ok), rejected=n - len(ok) - len(broken),
              failed=len(broken), errors={e: broken.count(e) for e in sorted(set(broken))},
              max_open=max_open,
              wall_s=round(wall, 3), requests_per_s=round(len(ok) / wall, 3),
              output_tokens_per_s=round(sum(d["tokens"] for d in ok) / wall, 1),
              full_s=round(full_s, 2), full_tokens_per_s=round(full_tps, 1), **steady,
              peak_running=max(running, default=0),
              mean_running=round(float(np.mean(running)), 1) if running else 0.0,
              clients=len(cpu), client_cpu=round(max(cpu) / wall, 3) if wall > 0 else None,
              ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99),
              itl_p50_s=pct(itl, 50), itl_p99_s=pct(itl, 99),
              tpot_p50_s=pct(tpot, 50), tpot_p99_s=pct(tpot, 99))


def _server_side(before: tuple[float, str], after: tuple[float, str]) -> dict:
  """A run's engine phase shares and host CPU use, from /metrics pages read before and after."""
  return dict(engine_share=phase_shares(engine_phases(before[1]), engine_phases(after[1])),
              **host_use(before, after))


def _random_checkpoint(shape: str, layer_types: str, context: int, folder: str) -> str:
  """A folder holding only the config.json of configs/<shape>.py: the server makes random bf16
  weights of it on the device (`--random_weights`), so a 7b load test writes and reads no 14 GB
  checkpoint, and this process never touches the accelerator, which the server needs whole."""
  from lckv_jax import checkpoint
  from lckv_jax.config import model_from_file
  cfg = model_from_file(config_path(shape), layer_types=layer_types, dtype="bfloat16",
                        param_dtype="bfloat16", scan_layers=False, remat="none",
                        max_position_embeddings=context)
  path = os.path.join(folder, "model")
  os.makedirs(path)
  with open(os.path.join(path, checkpoint.CONFIG_FILE), "w") as f:
    json.dump(checkpoint.config_to_dict(cfg), f, indent=2)
  # The server refuses a 32k model without its tokenizer: the shipped one has 32,000 pieces.
  from lckv_jax import tokenizer
  if cfg.vocab_size == 32000:
    tokenizer.save_tokenizer(tokenizer.load_tokenizer("kjv-bpe-32k"), path)
  return path


def _raise_open_files_limit() -> None:
  """Open files up to the hard limit (often 1,024 by default: fewer than a burst's streams);
  the server, started after, inherits it."""
  import resource
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if hard == resource.RLIM_INFINITY or soft < hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                else max(soft, 1 << 16), hard))


def sweep(measure, plan: list[tuple[float, int]], burst: int | None
          ) -> tuple[list[dict], str | None]:
  """`measure(rate, n)` at each (rate, requests) of `plan`, stopping past saturation (requests
  rejected or failed, or under half the rate achieved), then, where `burst` is given, that many
  at once (rate None): the results, and why the sweep stopped early (None if it did not). A
  point that raises ends the sweep, but the points measured before it are kept (a run of
  minutes must not lose them to its last point); one that raises first is raised."""
  results = []
  try:
    for rate, n in plan:
      results.append(r := measure(rate, n))
      if r["rejected"] or r.get("failed") or r["requests_per_s"] < 0.5 * rate:
        break
    if burst:
      results.append(measure(None, burst))
  except Exception as e:  # noqa: BLE001 - re-raised unless something was measured
    if not results:
      raise
    import traceback
    traceback.print_exc()
    print(f"the run stopped early ({type(e).__name__}: {e}); writing the {len(results)} "
          "points measured", file=sys.stderr, flush=True)
    return results, f"{type(e).__name__}: {e}"
  return results, None


def _device_kind() -> str:
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="1b", help="configs/<shape>.py (random weights)")
  p.add_argument("--layer_types", default="lckv")
  p.add_argument("--checkpoint", default=None, help="serve this model instead")
  p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--requests", type=int, default=100, help="requests per rate")
  p.add_argument("--duration", type=float, default=None,
                 help="seconds of arrivals per rate: rate x D requests (at least 8) instead of "
                 "--requests")
  p.add_argument("--burst", type=float, default=0,
                 help="end with K x rows requests arriving at once (the batch kept full: the "
                 "saturated throughput)")
  p.add_argument("--prompt", type=int, nargs=2, default=DEFAULT_PROMPT,
                 help="prompt length range")
  p.add_argument("--output", type=int, nargs=2, default=DEFAULT_OUTPUT,
                 help="output length range")
  p.add_argument("--max_batch", type=int, default=None)
  p.add_argument("--memory_bytes", type=int, default=None)
  p.add_argument("--steps_per_tick", type=int, default=STEPS_PER_TICK)
  p.add_argument("--busy_steps_per_tick", type=int, default=None,
                 help="the server's --busy_steps_per_tick (default: the server's, twice "
                 "--steps_per_tick)")
  p.add_argument("--prefill_chunk", default=None,
                 help="the server's --prefill_chunk (default: the server's default)")
  p.add_argument("--prefill_widths", type=int, default=None,
                 help="the server's --prefill_widths (default: the server's default)")
  p.add_argument("--prefill_tokens_per_tick", type=int, default=None,
                 help="the server's --prefill_tokens_per_tick (default: the server's default)")
  p.add_argument("--prefill_rows", type=int, default=None,
                 help="the server's --prefill_rows (default: the server's default)")
  p.add_argument("--admit_lookahead", type=int, default=None,
                 help="the server's --admit_lookahead (default: the server's default)")
  p.add_argument("--cache_dtype", default=None, choices=["int8", "fp8"],
                 help="the server's --cache_dtype (default: the compute dtype)")
  p.add_argument("--clients", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                 help="client processes sending the requests (default: half the CPU cores, at "
                 "most 8): one process falls behind hundreds of streams; each result records "
                 "the busiest one's CPU share (client_cpu), which near 1 means the client bound")
  p.add_argument("--max_open", type=int, default=None,
                 help="requests open at a time, across the client processes (default: twice the "
                 "server's rows, which keeps a saturated server's queue as long as its batch; 0: "
                 "no limit). A request's TTFT counts from its arrival, its wait for a connection "
                 "included")
  p.add_argument("--start_timeout", type=float, default=900,
                 help="seconds the server may take to start (weights, compiles) before the run "
                      "fails with its log")
  p.add_argument("--smoke", action="store_true", help="tiny model, tiny load (CI)")
  p.add_argument("--plot", default=None, metavar="RECORDS",
                 help="draw the figure of this record file to --out (a .png) and stop")
  p.add_argument("--table", default=None, metavar="RECORDS",
                 help="print the markdown table of this record file and stop")
  p.add_argument("--title", default="")
  p.add_argument("--out", default=default_out())
  args = p.parse_args(argv)
  if args.plot:
    return plot(records.read(args.plot), args.out, args.title)
  if args.table:
    print(markdown(records.read(args.table)))
    return args.table
  if args.smoke:
    args.shape, args.rates, args.requests = "tiny", [20.0, 80.0], 12
    args.prompt, args.output, args.max_batch = [2, 20], [2, 16], args.max_batch or 4
    args.burst = args.burst or 3
  if (args.max_batch is None) == (args.memory_bytes is None):
    p.error("give one of --max_batch or --memory_bytes")
  if args.clients < 1:
    p.error(f"--clients must be >= 1, got {args.clients}")
  if args.max_open is not None and args.max_open < 0:
    p.error(f"--max_open must be >= 0 (0: no limit), got {args.max_open}")
  # The server's allocator gets the memory its rows are sized for, no more: a batch that did not
  # fit would fail here, where a larger GPU would hide it.
  cap_allocator(args.memory_bytes)
  _raise_open_files_limit()  # a burst opens a connection per request, here and in the server
  context = args.prompt[1] + args.output[1]
  flags = [f"--max_prompt={args.prompt[1]}", f"--max_tokens={args.output[1]}",
           f"--steps_per_tick={args.steps_per_tick}", "--max_waiting=1000000"]
  flags.append(f"--max_batch={args.max_batch}" if args.max_batch else
               f"--memory_bytes={args.memory_bytes}")
  if args.prefill_chunk is not None:
    flags.append(f"--prefill_chunk={args.prefill_chunk}")
  if args.prefill_widths is not None:
    flags.append(f"--prefill_widths={args.prefill_widths}")
  if args.prefill_tokens_per_tick is not None:
    flags.append(f"--prefill_tokens_per_tick={args.prefill_tokens_per_tick}")
  if args.prefill_rows is not None:
    flags.append(f"--prefill_rows={args.prefill_rows}")
  if args.busy_steps_per_tick is not None:
    flags.append(f"--busy_steps_per_tick={args.busy_steps_per_tick}")
  if args.admit_lookahead is not None:
    flags.append(f"--admit_lookahead={args.admit_lookahead}")
  if args.cache_dtype:
    flags.append(f"--cache_dtype={args.cache_dtype}")
  with tempfile.TemporaryDirectory() as tmp:
    path = args.checkpoint or _random_checkpoint(args.shape, args.layer_types, context, tmp)
    if not args.checkpoint:
      flags.append("--random_weights")
    from lckv_jax import checkpoint
    cfg = checkpoint.load_config(path)
    t0 = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint else (
        f"{args.shape}_{args.layer_types}")
    log_path = os.path.join(args.out, f"server_{name}_{args.cache_dtype or 'bf16'}.log")
    proc, url = start_server(path, flags, timeout=args.start_timeout, log_path=log_path,
                             say_every=30)
    startup = time.monotonic() - t0
    print(f"server up in {startup:.0f} s (its log: {log_path})", flush=True)
    import httpx
    clients = None
    try:
      clients = Clients(args.clients)
      health = httpx.get(url + "/metrics").text
      gauges = _scrape(health)
      rows = int(gauges["lckv_max_batch"])
      prefill_rows = int(gauges["lckv_prefill_rows"])  # the server's, lowered to fit its memory
      lookahead = int(gauges["lckv_admit_lookahead"])
      budget = int(gauges["lckv_prefill_tokens_per_tick"])  # the server's, by default its rows'
      busy = int(gauges["lckv_busy_steps_per_tick"])
      chunk = int(gauges["lckv_prefill_chunk"])  # the server's (0: each prompt whole)
      widths = int(gauges["lckv_prefill_widths"])  # its first chunk's (0: whole prompts)
      max_open = 2 * rows if args.max_open is None else args.max_open or None
      page = lambda: (time.monotonic(), httpx.get(url + "/metrics").text)  # noqa: E731

      def measure(rate: float | None, n: int) -> dict:
        before = page()
        r = asyncio.run(run_rate(url, rate, n, args.prompt, args.output, cfg.vocab_size,
                                 seed=7 if rate is None else int(rate * 1000), clients=clients,
                                 max_open=max_open))
        r.update(_server_side(before, page()))
        print(json.dumps(r), flush=True)
        if rate is None and (warning := short_window(r, args.burst)) is not None:
          print(warning, file=sys.stderr, flush=True)
        return r

      plan = [(rate, max(8, round(rate * args.duration)) if args.duration else args.requests)
              for rate in args.rates]
      burst = max(1, round(args.burst * rows)) if args.burst else None
      results, incomplete = sweep(measure, plan, burst)
      peak = None
      with contextlib.suppress(httpx.HTTPError):
        peak = _scrape(httpx.get(url + "/metrics").text).get("lckv_device_memory_peak_bytes")
    finally:
      if clients is not None:
        clients.close()
      proc.send_signal(signal.SIGTERM)
      proc.wait(120)
  device = _device_kind()  # after the server has gone: one process on the accelerator
  label = args.checkpoint or f"{args.shape} {args.layer_types}"
  entry = records.entry(
      f"{label} {args.memory_bytes or args.max_batch}"
      + (f" {args.cache_dtype}" if args.cache_dtype else "") + (" smoke" if args.smoke else "")
      # Another load mix is another setting, not a re-run of this one.
      + ("" if (args.prompt, args.output) == (DEFAULT_PROMPT, DEFAULT_OUTPUT) or args.smoke
         else " prompt {}-{} output {}-{}".format(*args.prompt, *args.output))
      # So are more decode steps a tick (fewer, larger prefill jobs; tokens in larger bunches).
      + ("" if args.steps_per_tick == STEPS_PER_TICK else f" steps {args.steps_per_tick}")
      + ("" if busy == 2 * args.steps_per_tick else f" busy {busy}"),
      label=label, layer_types=cfg.layer_types, max_batch=rows,
      memory_bytes=args.memory_bytes, prompt=args.prompt, output=args.output,
      steps_per_tick=args.steps_per_tick, busy_steps_per_tick=busy,
      prefill_chunk=chunk, prefill_widths=widths,
      prefill_tokens_per_tick=budget, prefill_rows=prefill_rows, admit_lookahead=lookahead,
      burst=args.burst, clients=args.clients, max_open=max_open, incomplete=incomplete,
      cache_dtype=args.cache_dtype, server_start_s=round(startup, 1),
      peak_bytes=int(peak) if peak else None, results=results,
      saturated_tokens_per_s=saturated_tokens_per_s(results),
      sustained=sustained_rate(results), ttft_p99_limit_s=TTFT_P99_LIMIT_S,
      device=device, python=platform.python_version(), command=command(
          "benchmarks.serve_load", argv))
  path = records.record_path(args.out, "serve_load", device)
  records.update(path, [entry])
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
