"""Continuous batching on one jitted decode loop: the engine behind the HTTP server.

A fixed batch of `max_batch` rows decodes `steps_per_tick` tokens per call of the jitted decode
loop (`Generator.decode`). Between calls the engine admits waiting requests into free rows (each
prompt is prefilled on its own, left-padded to a bucket length so that prefill compiles once per
bucket, and inserted with `Generator.insert`), hands every row's new tokens to its request, and
frees the rows that finished (EOS, their budget) or were cancelled (a client that disconnected, a
stop sequence). Shapes never change after warm-up, so nothing recompiles; the cache is the
largest that `cache_bytes` fits in the memory given, which is where a smaller KV cache (LCKV's)
becomes more rows.

Each row samples with its own settings and seed (`Generator(per_row_sampling=True)`), so a
request's tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from lckv_jax.generation import Generator
from lckv_jax.sampling import Sampling

# Prompt lengths are padded up to one of these (then to multiples of the largest): one prefill
# compilation per bucket, not per prompt length.
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket(n: int) -> int:
  for b in BUCKETS:
    if n <= b:
      return b
  return -(-n // BUCKETS[-1]) * BUCKETS[-1]


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
  cancelled: bool = False


@dataclasses.dataclass
class Stats:
  """What /metrics reports (read without a lock: each field is one word)."""
  waiting: int = 0
  running: int = 0
  max_batch: int = 0
  tokens_generated: int = 0
  requests_finished: int = 0
  cache_slots_used: int = 0
  cache_slots: int = 0
  ttft: list = dataclasses.field(default_factory=list)  # seconds, drained by the metrics
  tpot: list = dataclasses.field(default_factory=list)


class Engine:
  """Owns the model, the decode state and a thread that runs the loop."""

  def __init__(self, model, *, max_batch: int, max_prompt: int, max_tokens: int,
               eos_ids: Sequence[int] = (), pad_id: int = 0, steps_per_tick: int = 8,
               max_waiting: int = 256):
    if max_batch < 1 or max_prompt < 1 or max_tokens < 1 or steps_per_tick < 1:
      raise ValueError("engine: max_batch, max_prompt, max_tokens and steps_per_tick must be >= 1")
    self.max_batch, self.max_prompt, self.max_tokens = max_batch, max_prompt, max_tokens
    self.steps_per_tick, self.max_waiting = steps_per_tick, max_waiting
    self.max_len = bucket(max_prompt) + max_tokens
    limit = model.config.max_position_embeddings
    if max_prompt + max_tokens > limit:
      raise ValueError(f"engine: max_prompt + max_tokens = {max_prompt + max_tokens} exceeds "
                       f"the model's max_position_embeddings={limit}")
    self.gen = Generator(model, max_new_tokens=max_tokens, max_len=self.max_len,
                         eos_id=list(eos_ids) or None, pad_id=pad_id, per_row_sampling=True)
    self.eos_ids = set(eos_ids)
    self.pad_id = pad_id
    self.stats = Stats(max_batch=max_batch, cache_slots=max_batch * self.max_len)
    self._waiting: queue.Queue[Request] = queue.Queue()
    self._rows: list[Request | None] = [None] * max_batch
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.state = None
    self.compile_seconds = 0.0

  # -- lifecycle -----------------------------------------------------------------------------

  def warm_up(self, buckets: Sequence[int] | None = None) -> float:
    """Compiles the decode loop and the prefill of each bucket up to `max_prompt`; returns the
    seconds it took (reported at start)."""
    t0 = time.monotonic()
    # Every row free: a one-token budget, already spent.
    self.state = self.gen.start([[self.pad_id]] * self.max_batch, max_new_tokens=1,
                                seeds=list(range(self.max_batch)))
    for b in buckets or [b for b in BUCKETS if b <= bucket(self.max_prompt)]:
      # A prompt of the bucket's length prefills unpadded (the fused path), a shorter one padded.
      for n in (b, b - 1) if b > 1 else (b,):
        new = self._prefill([self.pad_id] * n, Sampling(), 0, 1)
        self.state = self.gen.insert(self.state, 0, new)
    self.state = self.gen.decode(self.state, self.steps_per_tick)
    # The one op of freeing rows (`_collect`).
    self.state = self.state._replace(done=self.state.done | np.zeros(self.max_batch, bool))
    jax.block_until_ready(self.state.tokens)
    self.compile_seconds = time.monotonic() - t0
    return self.compile_seconds

  def start(self) -> None:
    if self.state is None:
      self.warm_up()
    self._thread = threading.Thread(target=self._loop, name="lckv-engine", daemon=True)
    self._thread.start()

  def stop(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops the loop; with `drain`, after the running and waiting requests finish."""
    if drain:
      deadline = None if timeout is None else time.monotonic() + timeout
      while (self.stats.running or self.stats.waiting) and (
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
    if self._waiting.qsize() >= self.max_waiting:
      raise QueueFull(f"{self.max_waiting} requests are waiting")
    self._waiting.put(request)
    self.stats.waiting = self._waiting.qsize()
    self._wake.set()

  def cancel(self, request: Request) -> None:
    """Frees the request's row at the next tick (or drops it from the queue)."""
    request.cancelled = True
    self._wake.set()

  # -- the loop ------------------------------------------------------------------------------

  def _prefill(self, prompt: list[int], sampling: Sampling, seed: int, max_tokens: int):
    padded = [self.pad_id] * (bucket(len(prompt)) - len(prompt))
    # Left padding is masked (segment 0) and positions count from the first real token, so the
    # row computes what the unpadded prompt would.
    return self.gen.start([prompt], max_new_tokens=max_tokens, sampling=[sampling],
                          seeds=[seed], pad_to=len(padded) + len(prompt))

  def _admit(self) -> None:
    for row in range(self.max_batch):
      if self._rows[row] is not None:
        continue
      try:
        req = self._waiting.get_nowait()
      except queue.Empty:
        break
      if req.cancelled:
        req.emit([], "cancelled")
        continue
      try:
        new = self._prefill(req.prompt, req.sampling, req.seed, req.max_tokens)
        self.state = self.gen.insert(self.state, row, new)
      except Exception as e:  # noqa: BLE001 - one bad request never stops the loop
        logging.exception("request %d failed at prefill", req.id)
        req.emit([], f"error: {e}")
        continue
      self._rows[row] = req
      req.generated = 0
    self.stats.waiting = self._waiting.qsize()

  def _collect(self) -> None:
    tokens = np.asarray(self.state.tokens)
    counts = np.asarray(self.state.num_generated)
    done = np.asarray(self.state.done)
    now = time.monotonic()
    finished = []
    for row, req in enumerate(self._rows):
      if req is None:
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
        finished.append(row)
        if req.generated > 1:
          self.stats.tpot.append((now - req.first_token_at) / (req.generated - 1))
    if finished:
      free = np.zeros(self.max_batch, bool)  # one shape, whatever finished: nothing recompiles
      free[finished] = True
      self.state = self.state._replace(done=self.state.done | free)
      for row in finished:
        self._rows[row] = None
      self.stats.requests_finished += len(finished)
    self.stats.running = sum(r is not None for r in self._rows)
    self.stats.cache_slots_used = int(sum(
        bucket(len(r.prompt)) + r.generated for r in self._rows if r is not None))

  def _loop(self) -> None:
    while not self._stop.is_set():
      self._admit()
      self._collect()  # first tokens of the admitted, and cancellations
      if not any(r is not None for r in self._rows):
        self._wake.wait(0.05)
        self._wake.clear()
        continue
      try:
        self.state = self.gen.decode(self.state, self.steps_per_tick)
      except Exception:  # noqa: BLE001 - the batch is lost; its requests end with an error
        logging.exception("decode step failed")
        for row, req in enumerate(self._rows):
          if req is not None:
            req.emit([], "error: decode failed")
            self._rows[row] = None
        self.warm_up([])
        continue
      self._collect()
