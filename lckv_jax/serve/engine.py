"""Continuous batching on one jitted decode loop: the engine behind the HTTP server.

A fixed batch of `max_batch` rows decodes `steps_per_tick` tokens per call of the jitted decode
loop (`Generator.decode`), `busy_steps_per_tick` while requests wait for a row (default twice as
many: a saturated server's ticks free twice the rows, so its prefill calls are fuller and its
host work per token halves; on the H200, every tick at 16 steps instead of 8 took 1b llama's
saturated server from 0.61 to 0.80-0.93 of its offline max batch, 7b LCKV's from 0.85 to 0.89,
while tokens streamed in bunches twice as large). Each tick (`Engine.tick`) the engine

1. admits waiting requests into free rows: each row is reserved for its request, and requests
   whose prompts make the same call shape become prefill jobs of up to `prefill_rows` rows each,
   the oldest waiting request first, its partners from the next `admit_lookahead` (`_admit`;
   `Generator.begin`, `PrefillJob.stack`; host work only). One
   call then prefills a chunk of every row of a job: a [1, C] call reads all the weights (for
   LCKV, once per iteration) for C tokens of work, so one job a prompt would leave the GPU's
   matmul rate unused exactly when requests pile up (on the H200, 7b LCKV's burst went from 4.7
   to 7.3 requests/s with jobs of up to 4);
2. prefills: with `prefill_chunk=C`, the next chunk of each job, oldest job first, until this
   tick's calls reach `prefill_tokens_per_tick` tokens (by default 8,192, the scale of vLLM's
   and SGLang's per-step token budgets, or twice the tokens a full busy tick decodes where that
   is more (`prefill_budget`): enough to refill every row that frees in a tick, so the batch stays
   full under load, while a long prompt holds the running rows up for a bounded time, not for
   its whole prefill; at least one call a tick). Oldest first (not round-robin)
   gives requests their first tokens in about arrival order (a job's partners may be younger
   than its oldest request, within the admission window), never starves a long prompt, and keeps
   one job's cache alive at a time (a job's cache is made at its first chunk). Without
   `prefill_chunk`, each prompt is prefilled whole, left-padded to a bucket length, one job a
   prompt (a job of several would compile every bucket at every batch size);
3. inserts each finished job's rows into theirs (`Generator.finish`, `Generator.insert_rows`):
   only then does a row decode (until then its `done` flag stays set, as a free row's, and the
   decode loop skips it);
4. decodes the running rows, hands every row's new tokens to its request, and frees the rows
   that finished (EOS, their budget) or were cancelled (a client that disconnected, a stop
   sequence; a request cancelled mid-prefill frees its row, and its job skips the row).

Shapes never change after warm-up (every later chunk is [k, C] and a first chunk [k, C/4], [k, C/2]
or [k, C], or with `prefill_widths=N` [k, a multiple of C/N], into a cache of `max_len` slots, k a
power of two up to `prefill_rows`, or a prompt is one of a few bucket lengths), so nothing
recompiles; the cache is the largest that
`cache_bytes` fits in the memory given, which is where a smaller KV cache (LCKV's) becomes more
rows.

Each row samples with its own settings and seed (`Generator(per_row_sampling=True)`), so a
request's tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from lckv_jax.generation import (Generator, PrefillJob, check_widths, chunked_length,
                                 first_chunk_sizes)
from lckv_jax.sampling import Sampling
from lckv_jax.serve import (PREFILL_CHUNK, PREFILL_ROWS, STEPS_PER_TICK, group_sizes,
                             prefill_budget)

# Threads compiling a server's calls at warm-up (`Engine.warm_up`).
COMPILE_THREADS = min(16, os.cpu_count() or 1)

# Prompt lengths are padded up to one of these (then to multiples of the largest): one prefill
# compilation per bucket, not per prompt length.
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket(n: int) -> int:
  for b in BUCKETS:
    if n <= b:
      return b
  return -(-n // BUCKETS[-1]) * BUCKETS[-1]


def chunk_for(prefill_chunk: int | None, max_prompt: int) -> int | None:
  """The chunk an engine prefills with: no longer than the longest prompt it takes (a longer one
  would only pad every prompt further)."""
  if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(
      prefill_chunk, int) or prefill_chunk < 1):
    raise ValueError(f"engine: prefill_chunk must be a positive integer or None, got "
                     f"{prefill_chunk!r}")
  return None if prefill_chunk is None else min(prefill_chunk, max_prompt)


def padded_length(n: int, chunk: int | None, widths: int | None = None) -> int:
  """Cache slots a prompt of `n` tokens takes alone, left padding included (`chunked_length`),
  or (without chunked prefill) its bucket length. (In a job with longer prompts of as many
  chunks, its first chunk is padded to theirs.)"""
  return bucket(n) if chunk is None else chunked_length(n, chunk, widths)


def row_slots(max_prompt: int, max_tokens: int, prefill_chunk: int | None,
              prefill_widths: int | None = None) -> int:
  """Cache slots of one row (`Engine.max_len`): the longest prompt as padded, and its budget."""
  return padded_length(max_prompt, chunk_for(prefill_chunk, max_prompt),
                       prefill_widths) + max_tokens


class QueueFull(RuntimeError):
  """More requests wait than the engine queues: the caller should retry later."""


@dataclasses.dataclass
class Request:
  """One completion: its prompt ids, budget and sampling, and where its tokens go.

  `emit(tokens, finish_reason)` is called from the engine's thread with each batch of new token
  ids; `finish_reason` is None while it runs, then 'stop' (EOS), 'length' (its budget) or
  'cancelled'.
  """
  prompt: list[int]
  max_tokens: int
  sampling: Sampling
  seed: int
  emit: Callable[[list[int], str | None], None]
  id: int = dataclasses.field(default_factory=itertools.count().__next__)
  arrival: float = dataclasses.field(default_factory=time.monotonic)
  first_token_at: float | None = None
  generated: int = 0
  slots: int = 0  # cache slots its prompt takes, padding included (set at admission)
  cancelled: bool = False


# The engine thread's time: admitting (host), prefilling (its calls dispatched and waited for),
# decoding (likewise), handing the tokens out to the requests (host), idle (nothing to run).
PHASES = ("admit", "prefill", "decode", "emit", "idle")


@dataclasses.dataclass
class Stats:
  """What /metrics reports (read without a lock: each field is one word)."""
  waiting: int = 0
  running: int = 0  # rows decoding
  prefilling: int = 0  # rows reserved for a request whose prompt is being prefilled
  max_batch: int = 0
  tokens_generated: int = 0
  # Decode calls whose tokens are all handed out: a reader of /metrics that sees this move knows
  # its tokens count stands at the end of a tick (serve_load's steady window starts and ends so).
  decode_ticks: int = 0
  requests_finished: int = 0
  cache_slots_used: int = 0
  cache_slots: int = 0
  ttft: list = dataclasses.field(default_factory=list)  # seconds, drained by the metrics
  tpot: list = dataclasses.field(default_factory=list)
  # Seconds of the engine's thread in each phase of its loop (`PHASES`): what binds a server.
  seconds: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
  # CPU seconds of the engine's thread: against its wall seconds, the share it ran rather than
  # waited (on the device, or for the GIL the HTTP thread holds).
  cpu_seconds: float = 0.0



@dataclasses.dataclass
class _Group:
  """Requests whose prompts make one call shape (`Engine._partners`): one prefill job of their
  rows."""
  rows: list[int | None]  # the batch row of each job row; None once its request is cancelled
  job: PrefillJob


class Engine:
  """Owns the model, the decode state and a thread that runs the loop."""

  def __init__(self, model, *, max_batch: int, max_prompt: int, max_tokens: int,
               eos_ids: Sequence[int] = (), pad_id: int = 0, steps_per_tick: int = STEPS_PER_TICK,
               max_waiting: int = 256, prefill_chunk: int | None = PREFILL_CHUNK,
               prefill_tokens_per_tick: int | None = None,
               prefill_rows: int = PREFILL_ROWS, admit_lookahead: int | None = None,
               cache_dtype=None, busy_steps_per_tick: int | None = None,
               prefill_widths: int | None = None):
    """`prefill_chunk`: prompt tokens per prefill call (at most `max_prompt`; None: each prompt
    whole, padded to a bucket length); `prefill_widths`: how many widths a prompt's first chunk
    may take (`first_chunk_sizes`: default C/4, C/2 and C; N: the multiples of C/N, less padding
    for N compilations a job size); `prefill_tokens_per_tick`: the most prompt tokens
    (padding included) prefilled between two decode calls, in whole calls (at least one;
    default `prefill_budget`, which grows with `max_batch` x `busy_steps_per_tick`);
    `busy_steps_per_tick`: decode steps a tick while requests wait for a row (default
    2 x `steps_per_tick`; `steps_per_tick` keeps every tick alike);
    `prefill_rows`: the most prompts one call prefills (at most `max_batch`; 1 without
    `prefill_chunk`); `admit_lookahead`: how far past the oldest waiting request admission looks
    for prompts of its job's shape (default 8 jobs' worth, 8 x `prefill_rows`; 0: arrival order
    only); `cache_dtype`: the KV cache's storage (default the compute dtype; "int8"
    or "fp8" quantize it, as `generate`'s)."""
    if max_batch < 1 or max_prompt < 1 or max_tokens < 1 or steps_per_tick < 1:
      raise ValueError("engine: max_batch, max_prompt, max_tokens and steps_per_tick must be >= 1")
    checks = [("prefill_rows", prefill_rows, 1)]
    if busy_steps_per_tick is not None:
      checks.append(("busy_steps_per_tick", busy_steps_per_tick, 1))
    if prefill_tokens_per_tick is not None:
      checks.append(("prefill_tokens_per_tick", prefill_tokens_per_tick, 1))
    if admit_lookahead is not None:
      checks.append(("admit_lookahead", admit_lookahead, 0))
    for name, value, least in checks:
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"engine: {name} must be an integer >= {least}, got {value!r}")
    self.max_batch, self.max_prompt, self.max_tokens = max_batch, max_prompt, max_tokens
    self.steps_per_tick, self.max_waiting = steps_per_tick, max_waiting
    self.busy_steps_per_tick = 2 * steps_per_tick if busy_steps_per_tick is None else \
        busy_steps_per_tick
    self.prefill_chunk = chunk_for(prefill_chunk, max_prompt)
    check_widths(prefill_widths, self.prefill_chunk)
    self.prefill_widths = prefill_widths
    # Sized for the busy ticks: those free the most rows, and only a saturated server fills them.
    self.prefill_tokens_per_tick = prefill_budget(
        max_batch, max(steps_per_tick, self.busy_steps_per_tick)) if \
        prefill_tokens_per_tick is None else prefill_tokens_per_tick
    self.prefill_rows = 1 if self.prefill_chunk is None else min(prefill_rows, max_batch)
    self.admit_lookahead = (8 * self.prefill_rows if self.prefill_rows > 1 else 0) if \
        admit_lookahead is None else admit_lookahead
    self.max_len = row_slots(max_prompt, max_tokens, prefill_chunk, prefill_widths)
    limit = model.config.max_position_embeddings
    if max_prompt + max_tokens > limit:
      raise ValueError(f"engine: max_prompt + max_tokens = {max_prompt + max_tokens} exceeds "
                       f"the model's max_position_embeddings={limit}")
    self.gen = self._generator(model, eos_id=list(eos_ids) or None, pad_id=pad_id,
                               cache_dtype=cache_dtype)
    self.eos_ids = set(eos_ids)
    self.pad_id = pad_id
    self.stats = Stats(max_batch=max_batch, cache_slots=max_batch * self.max_len)
    self._waiting: queue.Queue[Request] = queue.Queue()
    self._rows: list[Request | None] = [None] * max_batch  # the request holding each row
    self._groups: list[_Group] = []  # prefill jobs, oldest admission first
    # Requests taken from the queue, their jobs begun, not yet in a row: the admission window.
    self._pending: list[tuple[Request, PrefillJob]] = []
    self._prefilling: set[int] = set()  # rows whose request is in a job of `_groups`
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.state = None
    self.compile_seconds = 0.0
    # The last decode call's fetched tokens and the rows they belong to, not yet handed out
    # (`_end_rows`, `_hand_out`).
    self._unsent = None

  # The engine's clock, in seconds: its phases, requests' first tokens (their `arrival` is on it).
  # A simulation of the scheduling (`benchmarks.serve_sim`) puts a virtual one here.
  clock = staticmethod(time.monotonic)

  def _generator(self, model, **kw) -> Generator:
    """The prefill and decode calls the engine schedules (a simulation's stand in for them)."""
    return Generator(model, max_new_tokens=self.max_tokens, max_len=self.max_len,
                     per_row_sampling=True, prefill_chunk=self.prefill_chunk,
                     prefill_widths=self.prefill_widths, static_weights=True, **kw)

  # -- lifecycle -----------------------------------------------------------------------------

  def warm_up(self) -> float:
    """Compiles the decode loop and every prefill and insert call the engine will make
    (`_warm_lengths` at every job size); returns the seconds it took (reported at start)."""
    t0 = time.monotonic()
    self._reset()
    jobs = [PrefillJob.stack([self._begin([self.pad_id] * n, Sampling(), 0, 1)] * k, self.pad_id)
            for k in group_sizes(self.prefill_rows) for n in self._warm_lengths()]
    if self.prefill_chunk is not None:
      # The decode loop and each chunk call compiled first, side by side (XLA compiles outside
      # the GIL): with `prefill_widths` a server has dozens of calls, seconds each to compile,
      # and they run below in milliseconds. A job of several chunks has its first chunk's shape
      # among the others'.
      with concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS) as pool:
        compiled = [pool.submit(self.gen.compile_decode, self.state, self.steps_per_tick)]
        compiled += [pool.submit(self.gen.compile_prefill, job, job.num_chunks - 1)
                     for job in jobs]
        for c in compiled:
          try:
            c.result()
          except Exception:  # noqa: BLE001 - the call then compiles where it runs, below
            logging.exception("compiling ahead failed; the call compiles when it runs")
    for job in jobs:
      while not job.done:
        job = self.gen.prefill_next(job)
      self.state = self.gen.insert_rows(self.state, list(range(job.tokens.shape[0])),
                                        self.gen.finish(job))
    self.state = self.gen.decode(self.state, self.steps_per_tick)
    # The one op of freeing rows (`_collect`).
    self.state = self.state._replace(done=self.state.done | np.zeros(self.max_batch, bool))
    jax.block_until_ready(self.state.tokens)
    self.compile_seconds = time.monotonic() - t0
    return self.compile_seconds

  def _warm_lengths(self) -> list[int]:
    """Prompt lengths that between them run every prefill call a job can make (at any size)."""
    c = self.prefill_chunk
    if c is None:
      # Per bucket: a prompt of its length prefills unpadded (the fused path), a shorter padded.
      return [n for b in BUCKETS if b <= bucket(self.max_prompt)
              for n in ((b, b - 1) if b > 1 else (b,))]
    # The chunk calls: a first chunk of each width (a prompt of that length), and a later chunk
    # (C + 1), where prompts of those lengths can come.
    return [n for n in (*first_chunk_sizes(c, self.prefill_widths), c + 1)
            if 1 <= n <= self.max_prompt]

  def _reset(self) -> None:
    """A decode state whose rows are all free."""
    self.state = self.gen.free_rows(self.max_batch)

  def start(self) -> None:
    if self.state is None:
      self.warm_up()
    self._thread = threading.Thread(target=self._loop, name="lckv-engine", daemon=True)
    self._thread.start()

  def stop(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops the loop; with `drain`, after the running and waiting requests finish."""
    if drain:
      deadline = None if timeout is None else time.monotonic() + timeout
      while (self.stats.running or self.stats.prefilling or self.stats.waiting) and (
          deadline is None or time.monotonic() < deadline):
        time.sleep(0.02)
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join()

  # -- requests ------------------------------------------------------------------------------

  def submit(self, request: Request) -> None:
    if len(request.prompt) > self.max_prompt:
      raise ValueError(f"the prompt has {len(request.prompt)} tokens; this server takes at most "
                       f"{self.max_prompt}")
    if not 1 <= request.max_tokens <= self.max_tokens:
      raise ValueError(f"max_tokens must be in 1..{self.max_tokens}, got {request.max_tokens}")
    if self._num_waiting() >= self.max_waiting:
      raise QueueFull(f"{self.max_waiting} requests are waiting")
    self._waiting.put(request)
    self.stats.waiting = self._num_waiting()
    self._wake.set()

  def cancel(self, request: Request) -> None:
    """Frees the request's row at the next tick (or drops it from the queue)."""
    request.cancelled = True
    self._wake.set()

  # -- the loop ------------------------------------------------------------------------------

  def _begin(self, prompt: list[int], sampling: Sampling, seed: int, max_tokens: int
             ) -> PrefillJob:
    # Left padding is masked (segment 0) and positions count from the first real token, so the
    # row computes what the unpadded prompt would. With chunks, `begin` pads the first chunk
    # (`chunked_length`); without, the prompt to its bucket.
    pad_to = None if self.prefill_chunk is not None else bucket(len(prompt))
    return self.gen.begin([prompt], max_new_tokens=max_tokens, sampling=[sampling],
                          seeds=[seed], pad_to=pad_to)

  def _admit(self) -> None:
    """Waiting requests into free rows, as prefill jobs (host work: nothing runs yet).

    The oldest waiting request always goes first, and its job takes as many rows as a job can
    (`group_sizes`, within the free rows and `prefill_rows`) from the next `admit_lookahead`
    waiting requests, those whose prompts make the same call shape first (as many chunks, the
    same first-chunk width). Taking them in arrival order instead split the rows that free in a
    tick (about 6 of a saturated 7b LCKV server's 198) by chunk count into jobs of 1 or 2 prompts,
    so most prefill calls read all the weights (9 times, once an iteration) for a few hundred
    tokens of work. A request is passed over only by requests within that window, and only while
    it is not the oldest, so none waits without bound.
    """
    free = [row for row in range(self.max_batch) if self._rows[row] is None]
    self._pull(len(free) + self.admit_lookahead)
    while free and self._pending:
      part = self._partners(min(len(free), self.prefill_rows))
      rows, free = free[:len(part)], free[len(part):]
      for row, (req, job) in zip(rows, part):
        self._rows[row] = req
        req.generated = 0
        req.slots = job.tokens.shape[1]  # its prompt as `begin` padded it, before stacking
      self._groups.append(_Group(rows=rows, job=PrefillJob.stack([job for _, job in part],
                                                                 self.pad_id)))
      self._prefilling.update(rows)
    # The rows taken, now, and before the queue shrinks: counted only in `_collect`, a row freed
    # by the last decode call read as free through the whole prefill phase that refills it (57%
    # of a saturated 7b LCKV server's time: /metrics saw a full batch only 7 s of a 63 s burst
    # that kept requests waiting), and a request admitted into an idle server read as neither
    # waiting nor prefilling, so a drain (`stop`) polling then could end the loop under it.
    self._count_rows()
    self.stats.waiting = self._num_waiting()

  def _num_waiting(self) -> int:
    return self._waiting.qsize() + len(self._pending)

  def _pull(self, n: int) -> None:
    """Moves waiting requests from the queue into `_pending` (their jobs begun) until `n` are
    there or none waits; cancelled requests (here or in the queue) end."""
    kept = []
    for req, job in self._pending:
      if req.cancelled:
        req.emit([], "cancelled")
      else:
        kept.append((req, job))
    self._pending = kept
    while len(self._pending) < n:
      waiting = self._next_waiting()
      if waiting is None:
        break
      self._pending.append(waiting)

  def _partners(self, most: int) -> list[tuple[Request, PrefillJob]]:
    """The oldest pending request and up to `most` - 1 others of as many chunks from the
    window, the nearest in padded width first (then the oldest): one job's requests, removed
    from `_pending`, in arrival order. Their number is a power of two (`group_sizes`)."""
    # The window: the free rows' worth of waiting requests and `admit_lookahead` more (`_pull`).
    jobs = [job for _, job in self._pending]
    head = jobs[0]
    same = [i for i, job in enumerate(jobs) if job.num_chunks == head.num_chunks]
    same.sort(key=lambda i: (abs(jobs[i].tokens.shape[1] - head.tokens.shape[1]), i))
    k = next(k for k in group_sizes(self.prefill_rows) if k <= min(most, len(same)))
    taken = sorted(same[:k])
    part = [self._pending[i] for i in taken]
    for i in reversed(taken):
      del self._pending[i]
    return part

  def _count_rows(self) -> None:
    self.stats.prefilling = len(self._prefilling)
    self.stats.running = sum(r is not None for r in self._rows) - len(self._prefilling)

  def _next_waiting(self) -> tuple[Request, PrefillJob] | None:
    """The next waiting request and its one-prompt job (None when none waits); a cancelled
    request, or one its job refuses, ends here."""
    while True:
      try:
        req = self._waiting.get_nowait()
      except queue.Empty:
        return None
      if req.cancelled:
        req.emit([], "cancelled")
        continue
      try:
        return req, self._begin(req.prompt, req.sampling, req.seed, req.max_tokens)
      except Exception as e:  # noqa: BLE001 - one bad request never stops the loop
        logging.exception("request %d failed at prefill", req.id)
        req.emit([], f"error: {e}")

  def _prefill(self) -> None:
    """Runs this tick's prefill calls, oldest job first, and inserts each job that finishes into
    its rows."""
    budget, ran = self.prefill_tokens_per_tick, False
    while self._groups:
      group = self._groups[0]
      if all(row is None for row in group.rows):  # every request cancelled: `_collect` freed them
        self._groups.pop(0)
        continue
      # The call's tokens, padding included: a first chunk is C/4, C/2 or C wide. (Charged C
      # before, a 1b LCKV server's budget of 65,536 bought about 42,000 slots a tick.)
      start, end = group.job.bounds(group.job.chunks_done)
      tokens = group.job.tokens.shape[0] * (end - start)
      if ran and tokens > budget:
        break
      try:
        job = self.gen.prefill_next(group.job)
        if job.done:
          self._groups.pop(0)
          self.state = self.gen.insert_rows(self.state, group.rows, self.gen.finish(job))
          self._prefilling.difference_update(group.rows)
        else:
          group.job = job
      except Exception as e:  # noqa: BLE001 - one bad job never stops the loop
        logging.exception("a prefill job of %d rows failed", len(group.rows))
        self._groups.remove(group)
        for row in group.rows:
          if row is not None:
            self._rows[row].emit([], f"error: {e}")
            self._rows[row] = None
            self._prefilling.discard(row)
      budget -= tokens
      ran = True

  def _cancel_prefilling(self, row: int) -> None:
    """Frees a row whose request was cancelled while its job prefills; the job skips the row."""
    for group in self._groups:
      if row in group.rows:
        group.rows[group.rows.index(row)] = None
    self._prefilling.discard(row)
    self._rows[row] = None

  def _fetch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows' tokens, counts and done flags on the host, once the calls before are done: one
    transfer, one wait (each wait hands the GIL to the HTTP thread and back)."""
    return jax.device_get((self.state.tokens, self.state.num_generated, self.state.done))

  def _collect(self, fetched=None, held=None) -> None:
    """Hands each held row's new tokens to its request, ends the requests that finished or were
    cancelled and frees their rows. `held`: (row, request, freed) of the rows as they were when
    `fetched` was read, for a hand-out deferred past the next admission (`_end_rows`); freed rows
    are no longer the request's (admission may have refilled them), so they are not freed again.
    Default: every row held now."""
    tokens, counts, done = self._fetch() if fetched is None else fetched
    now = self.clock()
    finished = []
    used = 0  # cache slots of the rows still held after this call
    every = held is None
    if every:
      held = [(row, req, False) for row, req in enumerate(self._rows) if req is not None]
    for row, req, freed in held:
      if not freed and row in self._prefilling:  # nothing decoded yet, its `done` flag set
        if req.cancelled:
          req.emit([], "cancelled")
          self._cancel_prefilling(row)
          self.stats.requests_finished += 1
        else:
          used += req.slots
        continue
      new = tokens[row, req.generated:counts[row]].tolist()
      if new:
        if req.first_token_at is None:
          req.first_token_at = now
          self.stats.ttft.append(now - req.arrival)
        req.generated = int(counts[row])
        self.stats.tokens_generated += len(new)
      reason = None
      if req.cancelled:
        reason = "cancelled"
      elif done[row]:
        reason = "stop" if req.generated and int(tokens[row, req.generated - 1]) in \
            self.eos_ids else "length"
      if new or reason is not None:  # rows with nothing new send nothing across threads
        req.emit(new, reason)
      if reason is not None:
        if not freed:
          finished.append(row)
        if req.generated > 1:
          self.stats.tpot.append((now - req.first_token_at) / (req.generated - 1))
      else:
        used += req.slots + req.generated
    self._free(finished)
    self._count_rows()
    # Summed in the loop above from each request's slots, kept at admission: recomputing every
    # row's padded length here took half of a 5,082-row tick's hand-out (39 of 74 ms, profiled
    # on the development machine).
    if not every:  # the rows admitted since `fetched`, waiting for their prefill
      used += sum(self._rows[row].slots for row in self._prefilling)
    self.stats.cache_slots_used = used

  def _end_rows(self, fetched) -> list[tuple[int, Request, bool]]:
    """After a decode call: frees at once the rows whose request ended in `fetched` (EOS, its
    budget, cancelled), so that the next admission refills them, and returns the running rows as
    they are, for `_collect` to hand their tokens out later: while the device runs the next
    tick's prefill calls, not before they are dispatched. (At 1b LCKV and 4,820 running rows the
    hand-out took 10% of a saturated server's time, about 70 us a request each tick, against the
    GIL the HTTP thread holds while it streams to the same requests.)"""
    _, _, done = fetched
    running = [(row, req) for row, req in enumerate(self._rows)
               if req is not None and row not in self._prefilling]
    ended = {row for row, req in running if req.cancelled or done[row]}
    self._free(sorted(ended))
    self._count_rows()
    return [(row, req, row in ended) for row, req in running]

  def _free(self, rows: list[int]) -> None:
    """Frees the rows of ended requests: their `done` flags set, so the decode loop skips them."""
    if rows:
      free = np.zeros(self.max_batch, bool)  # one shape, whatever finished: nothing recompiles
      free[rows] = True
      self.state = self.state._replace(done=self.state.done | free)
      for row in rows:
        self._rows[row] = None
      self.stats.requests_finished += len(rows)

  def _hand_out(self) -> None:
    """The last decode call's tokens, to their requests (`_end_rows`)."""
    if self._unsent is not None:
      fetched, held = self._unsent
      self._unsent = None
      self._collect(fetched, held)
      self.stats.decode_ticks += 1

  def tick(self) -> bool:
    """One round of the loop: admit, prefill, decode, hand out tokens. The engine's thread calls
    it; a test may call it by hand on an engine that is warmed up but not started. Returns
    whether any row holds a request."""
    t = self.clock()
    self._admit()
    t = self._lap("admit", t)
    self._prefill()  # dispatched: the device runs it while the host hands the tokens out
    t = self._lap("prefill", t)
    self._hand_out()
    t = self._lap("emit", t)
    fetched = self._fetch()
    t = self._lap("prefill", t)
    self._collect(fetched)  # first tokens of the inserted, and cancellations
    t = self._lap("emit", t)
    if not any(r is not None for r in self._rows):
      return False
    if self.stats.running:  # rows only being prefilled have nothing to decode
      # Requests waiting for a row: a longer tick (its steps are an argument of the one
      # compiled loop, so nothing recompiles).
      steps = self.busy_steps_per_tick if self._num_waiting() else self.steps_per_tick
      try:
        self.state = self.gen.decode(self.state, steps)
        fetched = self._fetch()  # a failure on the device shows here, not at the dispatch
      except Exception:  # noqa: BLE001 - the batch is lost; its requests end with an error
        logging.exception("decode step failed")
        for row, req in enumerate(self._rows):
          if req is not None and row not in self._prefilling:  # jobs have own caches
            req.emit([], "error: decode failed")
            self._rows[row] = None
        self._reset()
        return True
      t = self._lap("decode", t)
      held = self._end_rows(fetched)
      if (self._num_waiting() or self._groups) and any(r is not None for r in self._rows):
        # Held past the next prefill's dispatch, so copied: the host arrays may view the
        # state's buffers, which the next calls donate (a refilled row's counts would then read
        # as the ended request's).
        self._unsent = (tuple(np.array(x) for x in fetched), held)
      else:  # no prefill next to hide the hand-out under: the tokens go out now
        self._unsent = (fetched, held)
        self._hand_out()
      self._lap("emit", t)
    return True

  def _lap(self, phase: str, since: float) -> float:
    now = self.clock()
    self.stats.seconds[phase] += now - since
    return now

  def _loop(self) -> None:
    cpu = time.thread_time()
    while not self._stop.is_set():
      busy = self.tick()
      self.stats.cpu_seconds = time.thread_time() - cpu
      if not busy:
        t = self.clock()
        self._wake.wait(0.05)
        self._wake.clear()
        self._lap("idle", t)
    self._hand_out()  # stopped without draining: the tokens already made still go out
