"""The OpenAI-compatible HTTP API over the engine (starlette; uvicorn serves it).

Endpoints: POST /v1/completions and /v1/chat/completions (streaming as server-sent events, or
one JSON body), GET /v1/models, /health and /metrics (Prometheus). A bad request gets a 400 with
an OpenAI-style error body and never reaches the engine; a full queue gets a 429 with
Retry-After. A client that disconnects frees its row.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lckv_jax.generation import first_chunk_sizes
from lckv_jax.sampling import Sampling, validate
from lckv_jax.serve.engine import PHASES, Engine, QueueFull, Request

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                     "seed", "n", "stream", "stream_options", "user"}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt"}) | {"messages"}


class BadRequest(ValueError):
  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


def error(status: int, message: str, param: str | None = None, kind: str | None = None,
          headers: dict | None = None) -> JSONResponse:
  kind = kind or {400: "invalid_request_error", 404: "not_found_error",
                  429: "rate_limit_error", 503: "server_error"}.get(status, "server_error")
  return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                 "code": None}}, status_code=status, headers=headers)


def _number(body: dict, name: str, default, kind=float):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and not float(value).is_integer()):
    raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got "
                     f"{value!r}", name)
  return kind(value)


class Outbox:
  """Events from the engine's thread into the event loop's queues, one wake-up a batch.

  `loop.call_soon_threadsafe` per event wakes the loop (a write to its self-pipe) each time: the
  5,328 events of a 1b LCKV server's tick took 57-87 ms of the engine's thread on the 2-core
  development machine, against 17-19 ms appended here and flushed by one call (medians of 10).
  A request's events keep their order (one list, flushed in order)."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop = loop
    self._lock = threading.Lock()
    self._items: list[tuple[asyncio.Queue, Any]] = []

  def put(self, queue: asyncio.Queue, item) -> None:
    """From any thread: `queue.put_nowait(item)` on the loop, soon."""
    with self._lock:
      self._items.append((queue, item))
      if len(self._items) > 1:  # a flush is already scheduled and has not run yet
        return
    self.loop.call_soon_threadsafe(self._flush)

  def _flush(self) -> None:
    with self._lock:
      items, self._items = self._items, []
    for queue, item in items:
      queue.put_nowait(item)


class Metrics:
  def __init__(self, engine: Engine):
    self.engine = engine
    self.registry = CollectorRegistry()
    r = self.registry
    self.queue = Gauge("lckv_queue_length", "Requests waiting for a row", registry=r)
    self.running = Gauge("lckv_running_rows", "Rows decoding a request", registry=r)
    self.prefilling = Gauge("lckv_prefilling_rows", "Rows whose request's prompt is being "
                            "prefilled", registry=r)
    self.rows = Gauge("lckv_max_batch", "Rows of the decode batch", registry=r)
    self.prefill_rows = Gauge("lckv_prefill_rows", "Most prompts one prefill call takes",
                              registry=r)
    self.admit_lookahead = Gauge("lckv_admit_lookahead", "Waiting requests past the oldest that "
                                 "admission looks through for a prefill job's partners",
                                 registry=r)
    self.busy_steps = Gauge("lckv_busy_steps_per_tick", "Decode steps between admissions while "
                            "requests wait for a row", registry=r)
    self.prefill_chunk = Gauge("lckv_prefill_chunk", "Prompt tokens a prefill call takes after "
                               "the first (0: each prompt whole)", registry=r)
    self.prefill_widths = Gauge("lckv_prefill_widths", "Widths a prompt's first prefill chunk "
                                "may take (0: each prompt whole)", registry=r)
    self.prefill_budget = Gauge("lckv_prefill_tokens_per_tick", "Most prompt tokens prefilled "
                                "between two decode calls", registry=r)
    self.cache = Gauge("lckv_cache_use", "Share of the cache's slots in use", registry=r)
    self.tokens = Counter("lckv_generated_tokens", "Tokens generated", registry=r)
    self.decode_ticks = Counter("lckv_decode_ticks", "Decode calls whose tokens are all handed "
                                "out (lckv_generated_tokens_total then ends a tick)", registry=r)
    self.requests = Counter("lckv_requests", "Requests by outcome", ["outcome"], registry=r)
    self.ttft = Histogram("lckv_time_to_first_token_seconds", "Arrival to first token",
                          registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
    self.tpot = Histogram("lckv_time_per_output_token_seconds", "Between a request's tokens",
                          registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))
    self.tokens_per_s = Gauge("lckv_tokens_per_second", "Generated tokens/s since the last "
                              "scrape", registry=r)
    self.engine_seconds = Counter("lckv_engine_seconds", "Seconds of the engine's loop by "
                                  "phase: admit, prefill, decode, emit (tokens to requests), "
                                  "idle", ["phase"], registry=r)
    self._seconds = dict.fromkeys(PHASES, 0.0)
    self.engine_cpu = Counter("lckv_engine_cpu_seconds", "CPU seconds of the engine's thread "
                              "(against its seconds by phase: the share it ran, not waited)",
                              registry=r)
    self._cpu = 0.0
    ProcessCollector(registry=r)  # process_cpu_seconds_total: the server's CPU, all threads
    self.peak = Gauge("lckv_device_memory_peak_bytes", "Peak bytes in use on the accelerator "
                      "(0 where the device does not say)", registry=r)
    self._last = (time.monotonic(), 0)
    self._ticks = 0

  def render(self) -> bytes:
    s = self.engine.stats
    self.queue.set(s.waiting)
    self.running.set(s.running)
    self.prefilling.set(s.prefilling)
    self.rows.set(s.max_batch)
    self.prefill_rows.set(self.engine.prefill_rows)
    self.admit_lookahead.set(self.engine.admit_lookahead)
    self.prefill_budget.set(self.engine.prefill_tokens_per_tick)
    self.busy_steps.set(self.engine.busy_steps_per_tick)
    chunk = self.engine.prefill_chunk
    self.prefill_chunk.set(chunk or 0)
    self.prefill_widths.set(0 if chunk is None else len(
        first_chunk_sizes(chunk, self.engine.prefill_widths)))
    self.cache.set(s.cache_slots_used / max(s.cache_slots, 1))
    self.peak.set((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0))
    # Read before the tokens (the engine counts a tick after its tokens): a page whose tick
    # count moved holds all of that tick's tokens.
    ticks = s.decode_ticks
    now, before = time.monotonic(), self._last
    self.tokens.inc(s.tokens_generated - before[1])
    self.tokens_per_s.set((s.tokens_generated - before[1]) / max(now - before[0], 1e-9))
    self._last = (now, s.tokens_generated)
    self.decode_ticks.inc(ticks - self._ticks)
    self._ticks = ticks
    for phase, seconds in list(s.seconds.items()):
      self.engine_seconds.labels(phase).inc(max(0.0, seconds - self._seconds[phase]))
      self._seconds[phase] = seconds
    self.engine_cpu.inc(max(0.0, s.cpu_seconds - self._cpu))
    self._cpu = s.cpu_seconds
    while s.ttft:
      self.ttft.observe(s.ttft.pop())
    while s.tpot:
      self.tpot.observe(s.tpot.pop())
    return generate_latest(self.registry)


def create_app(engine: Engine, tokenizer, model_name: str, *, retry_after: int = 1) -> Starlette:
  """The starlette app serving `engine`; `tokenizer` follows `lckv_jax.tokenizer.Tokenizer`."""
  metrics = Metrics(engine)
  created = int(time.time())
  outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}  # one loop under uvicorn

  def parse(body: Any, chat: bool
            ) -> tuple[list[int], int, Sampling, int, list[str], bool, bool]:
    if not isinstance(body, dict):
      raise BadRequest("the request body must be a JSON object")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
      raise BadRequest(f"unknown field(s) {unknown}; this server takes {sorted(allowed)}",
                       unknown[0])
    if body.get("model", model_name) != model_name:
      raise BadRequest(f"model {body['model']!r} is not served here; /v1/models lists "
                       f"{model_name!r}", "model")
    if _number(body, "n", 1, int) != 1:
      raise BadRequest("only n=1 is supported", "n")
    if chat:
      prompt = _chat_prompt(body.get("messages"), tokenizer)
    else:
      prompt = _prompt(body.get("prompt"), tokenizer)
    if not prompt:
      raise BadRequest("the prompt is empty", "messages" if chat else "prompt")
    if len(prompt) > engine.max_prompt:
      raise BadRequest(f"the prompt has {len(prompt)} tokens; this server's context takes at most "
                       f"{engine.max_prompt}", "messages" if chat else "prompt")
    max_tokens = _number(body, "max_tokens", min(16, engine.max_tokens), int)
    if not 1 <= max_tokens <= engine.max_tokens:
      raise BadRequest(f"max_tokens must be in 1..{engine.max_tokens}, got {max_tokens}",
                       "max_tokens")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _number(body, "top_k", 0, int)
    try:
      validate(temperature, top_k, top_p)
    except ValueError as e:
      raise BadRequest(str(e)) from None
    seed = _number(body, "seed", None, int)
    if seed is None:
      seed = uuid.uuid4().int % 2**32
    if not 0 <= seed < 2**32:
      raise BadRequest(f"seed must be in [0, 2**32), got {seed}", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) \
        or len(stop) > 4:
      raise BadRequest("stop must be a non-empty string or a list of at most 4", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
      raise BadRequest('stream_options must be {"include_usage": true or false}, with '
                       "stream=true", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return (prompt, max_tokens, Sampling(temperature, top_k, top_p), seed, stop, stream,
            include_usage)

  async def complete(http: HTTPRequest, chat: bool):
    try:
      body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return error(400, f"the request body is not valid JSON: {e}")
    try:
      prompt, max_tokens, sampling, seed, stop, stream, include_usage = parse(body, chat)
    except BadRequest as e:
      metrics.requests.labels("invalid").inc()
      return error(400, str(e), e.param)
    loop = asyncio.get_running_loop()
    outbox = outboxes.get(loop) or outboxes.setdefault(loop, Outbox(loop))
    events: asyncio.Queue = asyncio.Queue()
    req = Request(prompt, max_tokens, sampling, seed,
                  emit=lambda toks, reason: outbox.put(events, (toks, reason)))
    try:
      engine.submit(req)
    except QueueFull as e:
      metrics.requests.labels("rejected").inc()
      return error(429, f"the server is busy ({e}); retry later", headers={
          "Retry-After": str(retry_after)})
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    text = _Text(tokenizer, stop)

    async def events_until_done():
      """(delta text, finish_reason) until the request ends. Left early (a client that went
      away, an error), it frees the request's row."""
      ended = False
      try:
        while True:
          toks, reason = await events.get()
          # The last event lets go the text held back as the possible start of a stop sequence.
          delta = text.add(toks, last=reason is not None)
          if text.stopped and reason is None:  # a stop sequence: free the row now
            engine.cancel(req)
            reason = "stop"
          if reason is not None and reason.startswith("error"):
            ended = True
            raise RuntimeError(reason)
          ended = reason is not None
          yield delta, (None if reason is None else
                        "stop" if reason in ("stop", "cancelled") else reason)
          if ended:
            return
      finally:
        if not ended:
          engine.cancel(req)
          metrics.requests.labels("cancelled").inc()

    usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": text.count,  # noqa
                     "total_tokens": len(prompt) + text.count}

    def chunk(delta: str, finish: str | None) -> dict:
      if chat:
        choice = {"index": 0, "delta": {"content": delta} if delta else {},
                  "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model_name, "choices": [choice]}
      return {"id": rid, "object": "text_completion", "created": int(time.time()),
              "model": model_name,
              "choices": [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}]}

    if stream:
      async def sse():
        if chat:
          first = chunk("", None)
          first["choices"][0]["delta"] = {"role": "assistant"}
          yield f"data: {json.dumps(first)}\n\n"
        async for delta, finish in events_until_done():
          if delta or finish:
            yield f"data: {json.dumps(chunk(delta, finish))}\n\n"
        if include_usage:  # OpenAI's last chunk: no choices, the request's token counts
          last = dict(chunk("", None), choices=[], usage=usage())
          yield f"data: {json.dumps(last)}\n\n"
        metrics.requests.labels("completed").inc()
        yield "data: [DONE]\n\n"
      return StreamingResponse(sse(), media_type="text/event-stream")

    finish = None
    watcher = asyncio.ensure_future(_watch_disconnect(http, engine, req))
    try:
      async for _, f in events_until_done():
        finish = f or finish
    except RuntimeError as e:
      return error(500, f"the request failed in the engine: {e}", kind="server_error")
    finally:
      watcher.cancel()
    metrics.requests.labels("completed").inc()
    if chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": text.text},
                "finish_reason": finish}
      body = {"id": rid, "object": "chat.completion", "created": int(time.time()),
              "model": model_name, "choices": [choice], "usage": usage()}
    else:
      body = {"id": rid, "object": "text_completion", "created": int(time.time()),
              "model": model_name, "usage": usage(),
              "choices": [{"index": 0, "text": text.text, "finish_reason": finish,
                           "logprobs": None}]}
    return JSONResponse(body)

  async def completions(http):
    return await complete(http, chat=False)

  async def chat_completions(http):
    return await complete(http, chat=True)

  async def models(_):
    return JSONResponse({"object": "list", "data": [
        {"id": model_name, "object": "model", "created": created, "owned_by": "lckv-jax"}]})

  async def health(_):
    return JSONResponse({"status": "ok", "running": engine.stats.running,
                         "prefilling": engine.stats.prefilling,
                         "waiting": engine.stats.waiting})

  async def prometheus(_):
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

  return Starlette(routes=[
      Route("/v1/completions", completions, methods=["POST"]),
      Route("/v1/chat/completions", chat_completions, methods=["POST"]),
      Route("/v1/models", models),
      Route("/health", health),
      Route("/metrics", prometheus),
  ])


async def _watch_disconnect(http: HTTPRequest, engine: Engine, req: Request) -> None:
  """Cancels a non-streaming request whose client went away."""
  while True:
    if await http.is_disconnected():
      engine.cancel(req)
      return
    await asyncio.sleep(0.1)


def _prompt(prompt, tokenizer) -> list[int]:
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # one prompt in a list (n prompts per request are not supported)
  if isinstance(prompt, str):
    ids = [int(i) for i in tokenizer.encode(prompt)]
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids
  if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                      for t in prompt):
    vocab = getattr(tokenizer, "vocab_size", None)
    bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
      raise BadRequest(f"token id {bad[0]} is outside the vocabulary", "prompt")
    return list(prompt)
  raise BadRequest("prompt must be a string or a list of token ids (one prompt per request)",
                   "prompt")


def _chat_prompt(messages, tokenizer) -> list[int]:
  template = getattr(getattr(tokenizer, "tok", None), "apply_chat_template", None)
  if template is None or not getattr(tokenizer.tok, "chat_template", None):
    raise BadRequest("this model's tokenizer has no chat template: use /v1/completions",
                     "messages")
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in messages):
    raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
  return [int(i) for i in template(messages, add_generation_prompt=True, tokenize=True)]


class _Text:
  """A request's text so far, decoded from its tokens as they come, cut before the first stop
  sequence.

  Decoding is incremental, as vLLM's detokenizer does it: each `add` decodes only a window of
  recent ids, its context (a few ids already read) and the unread ones, and takes the text past
  the context's: decoding is not the concatenation of the tokens' texts (SentencePiece drops the
  leading space of a sequence's first word; the bytes of one character may come in several
  tokens). A call then costs its ids and a few more, not all the ids before it: a decode of them
  all made each call O(n) and a request O(n^2). Text that may begin a stop sequence waits for the
  next ids (or the last), so that no part of a stop sequence is streamed.
  """

  CONTEXT = 4  # ids before the unread ones that a window keeps, when they make a context

  def __init__(self, tokenizer, stop: list[str]):
    self.tokenizer, self.stop = tokenizer, stop
    self.text = ""  # the concatenation of the deltas returned
    self.stopped = False
    self._count = 0
    self._window: list[int] = []  # the context's ids, then the unread ones
    self._read = 0  # where the unread ids start in the window
    self._context = ""  # decode(window[:read]): what the window's text starts with
    self._taken = 0  # characters of the unread ids' text already taken (before an incomplete one)
    self._held = ""  # text that may begin a stop sequence: out of `text` until the next ids show

  @property
  def count(self) -> int:
    """The ids given up to the call that met a stop sequence, its own included (the usage)."""
    return self._count

  def add(self, ids: list[int], last: bool = False) -> str:
    """The text `ids` add (the delta); `last`: no ids follow, so held text is let go."""
    if self.stopped or not (ids or last):
      return ""
    self._count += len(ids)
    new, self._held = self._held + self._decode(ids), ""
    at = min((a for a in (new.find(s) for s in self.stop) if a >= 0), default=-1)
    if at >= 0:
      new, self.stopped = new[:at], True
    elif not last:
      cut = len(new) - self._stop_start(new)
      new, self._held = new[:cut], new[cut:]
    self.text += new
    return new

  def _decode(self, ids: list[int]) -> str:
    """The text `ids` add, but for a trailing incomplete character (the next ids may finish it)."""
    self._window.extend(ids)
    text = self.tokenizer.decode(self._window)
    # The decode of ids that end mid-character ends in one or more "\ufffd".
    complete = not text.endswith("\ufffd")
    new = (text if complete else text.rstrip("\ufffd"))[len(self._context) + self._taken:]
    self._taken += len(new)
    if complete:
      self._slide(text)
    return new

  def _slide(self, text: str) -> None:
    """Makes all ids read, and the last few of them the window's context for the next ids.

    A context must have text of its own (SentencePiece drops leading spaces until a sequence's
    first character; control ids have none) and decode as it does after the ids before it (as
    `text` ends): the last `CONTEXT` ids, or up to twice as many where those start mid-character,
    else the ids read last, else the window keeps its start (its text is then `text`).
    """
    end = len(self._window)
    near = range(end - self.CONTEXT, end - 2 * self.CONTEXT, -1)
    for start in [s for s in near if s > self._read] + [self._read]:
      context = self.tokenizer.decode(self._window[start:])
      if context and text.endswith(context):
        del self._window[:start]
        self._context = context
        break
    else:
      self._context = text
    self._read, self._taken = len(self._window), 0

  def _stop_start(self, text: str) -> int:
    """The length of the longest end of `text` that begins a stop sequence."""
    longest = max((len(s) for s in self.stop), default=0)
    for n in range(min(len(text), longest - 1), 0, -1):
      if any(s.startswith(text[-n:]) for s in self.stop):
        return n
    return 0
