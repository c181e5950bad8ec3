"""A streaming request's text (lckv_jax/serve/api.py's _Text): the deltas of ids given a few at a
time add up to the decode of all of them, cut before the first stop sequence, while each call
decodes only a short window of recent ids."""

import numpy as np
import pytest

from lckv_jax.serve.api import _Text
from lckv_jax.tokenizer import ByteTokenizer, load_tokenizer

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
