"""The OpenAI-compatible server end to end: `python -m lckv_jax.serve` in a subprocess on a tiny
model, talked to with the `openai` client users use (lckv_jax/serve/api.py, __main__.py)."""

import concurrent.futures
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest

from benchmarks.serve_load import start_server
from lckv_jax import checkpoint
from lckv_jax.generation import generate
from lckv_jax.serve.api import _Text
from lckv_jax.tokenizer import ByteTokenizer, load_tokenizer
from tests import tiny
from tests.conftest import NO_XLA_CACHE
from tests.generation_test import prompts
from tests.serve import offline_tokens

openai = pytest.importorskip("openai")

MAX_PROMPT, MAX_TOKENS = 32, 200
CHUNK = 8  # prompts of up to 4 chunks, prefilled between decode calls


def _start(path, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **NO_XLA_CACHE}
  env.pop("LCKV_DEBUG", None)
  return start_server(path, [f"--max_prompt={MAX_PROMPT}", f"--max_tokens={MAX_TOKENS}", *flags],
                      timeout=180, env=env)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("serve") / "tiny")
  # Two iterations of the cycle's prefill (the run settings it is saved with, which the server
  # loads): whole prompts and chunks of 8 then give different tokens, so the test sees the chunks.
  model = tiny.tiny_model(std=0.1, vocab_size=256, layer_types="0_2_2_3",
                          max_position_embeddings=256, forward_passes=1, backward_passes=1)
  checkpoint.save_model(path, model)
  proc, url = _start(path, "--max_batch=4", "--steps_per_tick=1", "--max_waiting=16",
                     f"--prefill_chunk={CHUNK}")
  yield path, url
  proc.send_signal(signal.SIGTERM)
  proc.wait(60)


def _client(url):
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _text(ids) -> str:
  return ByteTokenizer().decode(ids).rstrip("\ufffd")


def test_concurrent_greedy_requests_get_the_tokens_of_offline_generate(served):
  path, url = served
  client = _client(url)
  ps = prompts([3, 17, 5, 9, 1, 12, 30, 2, 7, 14, 4, 11, 6, 19, 8, 10], seed=31, vocab=256)
  budgets = [12, 3, 7, 40, 1, 9, 5, 12, 2, 8, 25, 4, 6, 10, 11, 12]

  def ask(i):
    return client.completions.create(model="tiny", prompt=ps[i], max_tokens=budgets[i],
                                     temperature=0)

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    got = list(pool.map(ask, range(16)))
  model = checkpoint.load_model(path, scan_layers=False)  # as the server decodes
  # The model has a cycle: chunks change its prefill, so the reference uses the same ones.
  wants = offline_tokens(model, ps, budgets, prefill_chunk=CHUNK)
  for p, n, r, want in zip(ps, budgets, got, wants):
    assert r.choices[0].text == _text(want)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(p)
  # The chunks are seen: the longest prompt (4 chunks) gets other tokens prefilled whole.
  assert wants[6] != generate(model, [ps[6]], max_new_tokens=budgets[6]).tokens[0]


def test_streaming_and_not_agree_and_stop_sequences_cut(served):
  _, url = served
  client = _client(url)
  p = prompts([6], seed=5, vocab=256)[0]
  # top_k is not OpenAI's; clients send it as vLLM's users do, in the body.
  whole = client.completions.create(model="tiny", prompt=p, max_tokens=30, temperature=0.8,
                                    seed=123, extra_body={"top_k": 40}).choices[0].text
  parts = client.completions.create(model="tiny", prompt=p, max_tokens=30, temperature=0.8,
                                    seed=123, extra_body={"top_k": 40}, stream=True)
  chunks = list(parts)
  assert "".join(c.choices[0].text for c in chunks) == whole
  assert chunks[-1].choices[0].finish_reason == "length"
  # OpenAI's stream_options: a last chunk with no choices and the token counts.
  counted = list(client.completions.create(model="tiny", prompt=p, max_tokens=30, temperature=0.8,
                                           seed=123, extra_body={"top_k": 40}, stream=True,
                                           stream_options={"include_usage": True}))
  assert "".join(c.choices[0].text for c in counted[:-1]) == whole
  assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 30
  assert counted[-1].usage.prompt_tokens == len(p)
  greedy = client.completions.create(model="tiny", prompt=p, max_tokens=30, temperature=0)
  text = greedy.choices[0].text
  stop = text[5:7]
  cut = client.completions.create(model="tiny", prompt=p, max_tokens=30, temperature=0,
                                  stop=[stop])
  assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_400_with_an_openai_error_body(served):
  _, url = served
  cases = [
      (b"{not json", "not valid JSON"),
      (json.dumps({"prompt": [1], "bogus": 1}), "unknown field(s) ['bogus']"),
      (json.dumps({"prompt": list(range(1, 40))}), f"at most {MAX_PROMPT}"),
      (json.dumps({"prompt": [1], "max_tokens": 0}), f"max_tokens must be in 1..{MAX_TOKENS}"),
      (json.dumps({"prompt": [1], "max_tokens": 10_000}), "max_tokens must be in"),
      (json.dumps({"prompt": [1], "temperature": -1}), "temperature must be a number >= 0"),
      (json.dumps({"prompt": [1], "top_p": 0}), "top_p must be in (0, 1]"),
      (json.dumps({"prompt": [1], "n": 2}), "only n=1"),
      (json.dumps({"prompt": [300]}), "token id 300 is outside the vocabulary"),
      (json.dumps({"prompt": [1], "model": "gpt-4"}), "is not served here"),
      (json.dumps([1, 2]), "must be a JSON object"),
      (json.dumps({"prompt": [1], "stream_options": {"include_usage": True}}), "with stream=true"),
      (json.dumps({"prompt": [1], "stream": True, "stream_options": {"x": 1}}), "stream_options"),
  ]
  for body, message in cases:
    r = httpx.post(url + "/v1/completions", content=body, timeout=30)
    assert r.status_code == 400, (body, r.text)
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error", (body, err)
  r = httpx.post(url + "/v1/chat/completions", timeout=30,
                 json={"messages": [{"role": "user", "content": "hi"}]})
  assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
  with pytest.raises(openai.BadRequestError):
    _client(url).completions.create(model="tiny", prompt=[1], max_tokens=0)
  # The server is still serving.
  assert _client(url).completions.create(model="tiny", prompt=[1, 2], max_tokens=2,
                                         temperature=0).usage.completion_tokens == 2


def _metrics(url) -> dict:
  from prometheus_client.parser import text_string_to_metric_families
  out = {}
  for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
    for s in family.samples:
      out[(s.name, tuple(sorted(s.labels.items())))] = s.value
  return out


def test_a_disconnected_client_frees_its_row_and_overload_gets_429(served):
  _, url = served
  before = _metrics(url).get(("lckv_requests_total", (("outcome", "cancelled"),)), 0)
  with httpx.stream("POST", url + "/v1/completions", timeout=30,
                    json={"prompt": [1, 2, 3], "max_tokens": MAX_TOKENS, "temperature": 0,
                          "stream": True}) as r:
    next(r.iter_lines())  # the first event, then hang up
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and httpx.get(url + "/health").json()["running"]:
    time.sleep(0.05)
  assert httpx.get(url + "/health").json()["running"] == 0
  after = _metrics(url)
  assert after[("lckv_requests_total", (("outcome", "cancelled"),))] == before + 1
  # 4 rows and 16 places in the queue: a burst of 40 long requests overflows.
  def ask(_):
    return httpx.post(url + "/v1/completions", timeout=120,
                      json={"prompt": [5, 6], "max_tokens": 60, "temperature": 0})
  with concurrent.futures.ThreadPoolExecutor(40) as pool:
    codes = [r.status_code for r in pool.map(ask, range(40))]
  # At least the rows and the queue are served (more where rows free up during the burst).
  assert codes.count(200) >= 16 and codes.count(429) >= 1 and set(codes) <= {200, 429}
  assert ask(0).status_code == 200  # the burst is over: served again
  m = _metrics(url)
  assert m[("lckv_max_batch", ())] == 4 and ("lckv_queue_length", ()) in m
  assert m[("lckv_time_to_first_token_seconds_count", ())] >= codes.count(200)
  assert m[("lckv_requests_total", (("outcome", "rejected"),))] == codes.count(429)
  assert m[("lckv_generated_tokens_total", ())] > 0
  assert m[("lckv_prefill_rows", ())] >= 1
  # What serve_load records of the server: its chunk, first-chunk widths, and ticks.
  assert m[("lckv_prefill_chunk", ())] >= 1 and m[("lckv_prefill_widths", ())] >= 1
  assert m[("lckv_decode_ticks_total", ())] >= 1
  phases = {labels[0][1]: v for (name, labels), v in m.items()
            if name == "lckv_engine_seconds_total"}
  assert set(phases) == {"admit", "prefill", "decode", "emit", "idle"}
  assert phases["decode"] > 0 and phases["prefill"] > 0 and all(v >= 0 for v in phases.values())
  # The engine thread's CPU: at most its busy seconds; the process's, all threads.
  busy = sum(v for k, v in phases.items() if k != "idle")
  assert 0 < m[("lckv_engine_cpu_seconds_total", ())] <= 1.05 * busy + 0.05
  assert m[("process_cpu_seconds_total", ())] >= m[("lckv_engine_cpu_seconds_total", ())]


def test_models_health_and_sigterm_drains_the_running_requests(tmp_path):
  path = str(tmp_path / "tiny")
  checkpoint.save_model(path, tiny.tiny_model(std=0.1, vocab_size=256,
                                              max_position_embeddings=256))
  proc, url = _start(path, "--max_batch=2", "--steps_per_tick=1", "--model_name=mine")
  try:
    assert [m.id for m in _client(url).models.list().data] == ["mine"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      running = pool.submit(lambda: httpx.post(url + "/v1/completions", timeout=120, json={
          "prompt": [1, 2], "max_tokens": MAX_TOKENS, "temperature": 0}))
      while httpx.get(url + "/health").json()["running"] == 0:
        time.sleep(0.01)
      proc.send_signal(signal.SIGTERM)
      r = running.result()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    # uvicorn re-raises the signal once it has shut down gracefully: killed by SIGTERM, late.
    assert proc.wait(60) == -signal.SIGTERM
  finally:
    if proc.poll() is None:
      proc.kill()


def test_the_prefill_chunk_flag():
  import argparse

  from lckv_jax.serve.__main__ import chunk_flag
  assert chunk_flag("64") == 64
  assert chunk_flag("0") is None and chunk_flag("none") is None and chunk_flag("None") is None
  for bad in ("-3", "x", "2.5"):
    with pytest.raises(argparse.ArgumentTypeError, match="a positive number of tokens, 0 or "
                                                         "'none'"):
      chunk_flag(bad)


@pytest.mark.parametrize("flag", ["prefill_rows", "steps_per_tick", "busy_steps_per_tick",
                                  "prefill_tokens_per_tick", "prefill_widths"])
def test_the_scheduling_flags_are_checked_before_anything_loads(flag):
  from lckv_jax.serve.__main__ import main
  for bad in ("0", "-2"):
    with pytest.raises(ValueError, match=f"--{flag} must be >= 1, got {bad}"):
      main(["--checkpoint", "/nonexistent", "--max_batch", "4", f"--{flag}", bad])
  if flag == "prefill_widths":
    with pytest.raises(ValueError, match="--prefill_widths=8 needs a --prefill_chunk"):
      main(["--checkpoint", "/nonexistent", "--max_batch", "4", "--prefill_chunk", "0",
            "--prefill_widths", "8"])


def test_random_weights_of_a_32k_shape_come_with_its_tokenizer_and_none_fails_before_the_model(
    tmp_path, monkeypatch):
  """serve_load's random 1b checkpoint carries the shipped kjv-bpe-32k tokenizer (the server
  refuses a 32k model without one), and the server checks the tokenizer before it builds any
  weights: a folder without one fails at once, not after minutes of making or loading them."""
  import lckv_jax
  from benchmarks.serve_load import _random_checkpoint
  from lckv_jax.serve.__main__ import main
  from lckv_jax.tokenizer import load_tokenizer
  path = _random_checkpoint("1b", "lckv", 1024, str(tmp_path))
  assert sorted(os.listdir(path)) == ["config.json", "tokenizer.model"]
  assert load_tokenizer(path, vocab_size=32000).vocab_size == 32000
  os.remove(os.path.join(path, "tokenizer.model"))

  def no_model(*args, **kwargs):
    raise AssertionError("the model was built before the tokenizer was checked")
  monkeypatch.setattr(lckv_jax, "Transformer", no_model)
  monkeypatch.setattr(checkpoint, "load_model", no_model)
  with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
    main([f"--checkpoint={path}", "--random_weights", "--max_batch=2"])


# -- a streaming request's text (_Text): the deltas of ids given a few at a time add up to the
# decode of all of them, cut before the first stop sequence, while each call decodes only a short
# window of recent ids --------------------------------------------------------------------------

BPE_SPECIAL = [0, 1, 2, 31936]  # unk, bos, eos, and '▁' alone: no text at a sequence's start
BPE_BYTES = range(3, 259)  # the byte-fallback pieces <0x00>..<0xFF>


@pytest.fixture(scope="module", params=["byte", "kjv-bpe-32k"])
def tok(request):
  return load_tokenizer(request.param)


def _random_ids(tok, rng, n: int) -> list[int]:
  """Ids that make decoding hard: for kjv-bpe-32k many byte pieces (characters split across
  tokens, invalid UTF-8) and ids with no text, which a uniform draw from 32,000 seldom gives."""
  if isinstance(tok, ByteTokenizer):
    ascii_ = rng.integers(32, 127, n)
    return np.where(rng.random(n) < 0.5, rng.integers(0, 256, n), ascii_).tolist()
  kind = rng.random(n)
  return np.where(kind < 0.25, rng.integers(BPE_BYTES.start, BPE_BYTES.stop, n),
                  np.where(kind < 0.3, rng.choice(BPE_SPECIAL, n),
                           rng.integers(0, tok.vocab_size, n))).tolist()


def _feed(text: _Text, ids: list[int], rng, last: bool = False) -> list[str]:
  """Gives `ids` in chunks of 1..9; returns the deltas."""
  deltas, i = [], 0
  while i < len(ids):
    k = int(rng.integers(1, 10))
    deltas.append(text.add(ids[i:i + k], last=last and i + k >= len(ids)))
    i += k
  return deltas


def _whole(tok, ids) -> str:
  """The text of all `ids`, less a trailing incomplete character (held back until finished)."""
  return tok.decode(ids).rstrip("\ufffd")


def test_deltas_add_up_to_the_decode_of_all_ids(tok):
  rng = np.random.default_rng(0)
  for _ in range(300):
    ids = _random_ids(tok, rng, int(rng.integers(1, 80)))
    text = _Text(tok, [])
    deltas = _feed(text, ids, rng)
    assert "".join(deltas) == text.text == _whole(tok, ids), ids
    assert text.count == len(ids) and not text.stopped


def test_text_is_cut_before_a_stop_sequence(tok):
  rng = np.random.default_rng(1)
  cuts = 0
  for _ in range(300):
    ids = _random_ids(tok, rng, int(rng.integers(10, 80)))
    full = _whole(tok, ids)
    if len(full) < 2:
      continue
    a = int(rng.integers(0, len(full) - 1))
    stop = full[a:a + int(rng.integers(1, 7))]
    text = _Text(tok, [stop])
    deltas = _feed(text, ids, rng, last=True)
    assert "".join(deltas) == text.text == full[:full.find(stop)], (ids, stop)
    assert text.stopped
    cuts += text.text != full
  assert cuts > 200


def test_a_stop_sequence_across_two_calls_is_never_streamed():
  text = _Text(ByteTokenizer(), ["lo w"])
  deltas = [text.add(list(s.encode())) for s in ("hel", "lo", " wo", "rld")]
  assert deltas == ["he", "l", "", ""] and text.text == "hel" and text.stopped  # "lo" waits
  assert text.count == len("hello wo")  # the calls after the stop are not counted


def test_text_that_may_begin_a_stop_sequence_waits_for_the_next_ids():
  text = _Text(ByteTokenizer(), ["xyz", "ab"])
  assert text.add(list(b"12xy")) == "12"
  assert text.add(list(b"a")) == "xy"  # "xya" is not "xyz", but "a" may begin "ab"
  assert text.add(list(b"c")) == "ac"
  assert text.add(list(b"xy")) == ""
  assert text.add([], last=True) == "xy"  # no more ids: no stop sequence follows
  assert text.text == "12xyacxy" and not text.stopped


def test_several_stop_sequences_cut_at_the_earliest(tok):
  rng = np.random.default_rng(2)
  for _ in range(200):
    ids = _random_ids(tok, rng, int(rng.integers(20, 80)))
    full = _whole(tok, ids)
    if len(full) < 4:
      continue
    starts = rng.integers(0, len(full) - 1, 3)
    stops = [full[a:a + int(rng.integers(1, 6))] for a in starts] + ["not in the text \x00"]
    text = _Text(tok, stops)
    deltas = _feed(text, ids, rng, last=True)
    want = full[:min(full.find(s) for s in stops if s in full)]
    assert "".join(deltas) == text.text == want, (ids, stops)
    assert text.stopped


def test_overlapping_stop_sequences_cut_at_the_earliest():
  for chunks in (["abcd"], ["ab", "cd"], ["a", "b", "c", "d"]):
    text = _Text(ByteTokenizer(), ["cd", "bc"])
    assert "".join(text.add(list(c.encode())) for c in chunks) == text.text == "a"
    assert text.stopped


def test_after_a_stop_calls_add_nothing():
  text = _Text(ByteTokenizer(), ["b"])
  assert text.add(list(b"abc")) == "a" and text.stopped and text.count == 3
  assert text.add(list(b"def")) == "" and text.add([], last=True) == ""
  assert text.text == "a" and text.count == 3


def test_characters_split_across_calls_wait_for_their_last_byte():
  chars = "é€😀 ok"
  text = _Text(ByteTokenizer(), [])
  deltas = [text.add([b]) for b in chars.encode()]
  assert "\ufffd" not in "".join(deltas) and text.text == chars
  assert deltas[:9] == ["", "é", "", "", "€", "", "", "", "😀"]
  bpe = load_tokenizer("kjv-bpe-32k")
  ids = bpe.encode("the end " + chars).tolist()  # é€😀: byte-fallback pieces
  text = _Text(bpe, [])
  deltas = [text.add([i]) for i in ids]
  assert "\ufffd" not in "".join(deltas) and text.text == "the end " + chars


class _Recording:
  """A tokenizer that records how many ids each decode is given."""

  def __init__(self, tok):
    self.tok, self.lengths = tok, []

  def decode(self, ids):
    self.lengths.append(len(ids))
    return self.tok.decode(ids)


def test_each_call_decodes_a_short_window_not_all_ids(tok):
  rng = np.random.default_rng(3)
  if isinstance(tok, ByteTokenizer):  # valid UTF-8: a byte that ends no character waits
    ids = tok.encode("In the beginning: é, €, 😀. " * 60).tolist()[:2000]
  else:  # words, without the pieces that have no text of their own
    ids = rng.integers(BPE_BYTES.stop, BPE_SPECIAL[-1], 2000).tolist()
  for first, size in ((1, 1), (8, 8), (256, 8)):  # a long first call is not decoded again
    recording = _Recording(tok)
    text = _Text(recording, ["never \x00"])
    deltas = [text.add(ids[:first])]
    recording.lengths.clear()
    deltas += [text.add(ids[i:i + size]) for i in range(first, len(ids), size)]
    assert "".join(deltas) + text.add([], last=True) == text.text == _whole(tok, ids)
    # A few ids of context and the unread ones (a character's first bytes wait for its last).
    assert max(recording.lengths) <= (16 if size == 1 else 24), (first, size)


def test_the_outbox_hands_a_thread_s_events_over_in_order_with_one_wake_up_a_batch():
  import asyncio
  import threading
  from lckv_jax.serve.api import Outbox

  async def main():
    loop = asyncio.get_running_loop()
    wakes = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: (wakes.append(1), real(*a))[1]
    box, queues = Outbox(loop), [asyncio.Queue() for _ in range(50)]
    rng = np.random.default_rng(0)
    sent = [[(rng.integers(0, 99, rng.integers(1, 9)).tolist(), None) for _ in range(20)]
            for _ in queues]

    go, ticked = threading.Semaphore(0), threading.Semaphore(0)

    def engine_thread():  # each "tick" hands every queue one event, as `Engine._collect` does
      for tick in range(20):
        go.acquire()
        for q, events in zip(queues, sent):
          box.put(q, events[tick])
        ticked.release()
    thread = threading.Thread(target=engine_thread)
    thread.start()
    got = [[] for _ in queues]
    for _ in range(20):
      # The loop blocks while the thread puts a tick's events (a busy loop, as a server's is), so
      # the count below does not depend on how the two threads interleave: a machine under load
      # once flushed between puts often enough to fail a looser bound.
      go.release()
      ticked.acquire()
      for q, g in zip(queues, got):
        g.append(await q.get())
    thread.join()
    assert got == sent  # every event, each queue's in order
    assert len(wakes) == 20  # one wake-up a tick, not one an event
  asyncio.run(main())
