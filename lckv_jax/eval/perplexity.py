"""Perplexity over a token array or a text, in windows (chunked, or sliding with a stride).

    python -m lckv_jax.eval.perplexity --checkpoint DIR --text_file F.txt --context_len 1024 \
        [--stride 512] [--forward_passes 7 --backward_passes 2 | --sequential]

Every target token 1..N-1 is scored exactly once. A window feeds `context_len` tokens
x[s:s+n] and predicts x[s+1:s+n+1]; it scores only the targets no earlier window scored:

- chunked (`stride == context_len`, the default): disjoint windows, the first target of a chunk
  predicted from the last token of the previous one (lm-evaluation-harness's rolling windows);
- sliding (`stride < context_len`): each window scores its last `stride` targets, which thus
  see at least `context_len - stride` tokens of context.

The last window is moved back to end at the last token, so it keeps a full context. With a
`prefix_token` (BOS/EOT) prepended, the first real token is scored too (as lm-eval does).
Note: HF `run_clm`-style block evaluation (the reference's reported numbers) instead scores each
block of `context_len` tokens independently and never scores a block's first token.

Cyclic layer types run the iteration plan with `forward_passes`/`backward_passes` (the model's
defaults unless given), or the exact token-by-token mode with `sequential=True`, which reads
earlier tokens from a KV cache as generation does: `cache_dtype` ("int8", "fp8", "bfloat16";
default the compute dtype) then measures what a cache format costs in perplexity.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lckv_jax import cli, quant

PROG = "python -m lckv_jax.eval.perplexity"

_STATIC = ("graphdef", "forward_passes", "backward_passes", "sequential", "cache_dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def model_logits(state, inputs_BxT, *, graphdef, forward_passes, backward_passes, sequential,
                 cache_dtype=None):
  """Logits of the model `nnx.merge(graphdef, state)`; compiled once per structure and shape."""
  model = nnx.merge(graphdef, state)
  if sequential:
    return model.sequential(inputs_BxT, cache_dtype=cache_dtype)
  return model(inputs_BxT, forward_passes=forward_passes, backward_passes=backward_passes)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _score(state, inputs_BxT, targets_BxT, **static):
  logits_BxTxV = model_logits(state, inputs_BxT, **static).astype(jnp.float32)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return logp_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT


class Scorer:
  """Jitted log-probabilities of target tokens under the model's parallel (or sequential) mode.

  `cache_dtype` (sequential only): the storage of the KV cache the sequential mode reads
  (`lckv_jax.quant`: "int8", "fp8", a float dtype; default the compute dtype).
  Compilations are shared by every Scorer of models with the same structure and pass options.
  """

  def __init__(self, model, *, forward_passes: int | None = None,
               backward_passes: int | None = None, sequential: bool = False,
               cache_dtype=None):
    check_passes(forward_passes, backward_passes)
    if cache_dtype is not None and not sequential:
      raise ValueError(f"cache_dtype={cache_dtype!r} needs sequential=True (--sequential): the "
                       "parallel mode reads no KV cache")
    self.config = model.config
    if cache_dtype is not None:
      cache_dtype = quant.cache_dtype(cache_dtype, self.config.compute_dtype).name
    self.graphdef, self.state = nnx.split(model)
    self.static = dict(graphdef=self.graphdef, forward_passes=forward_passes,
                       backward_passes=backward_passes, sequential=bool(sequential),
                       cache_dtype=cache_dtype)

  def check_tokens(self, tokens, what: str = "token ids") -> None:
    check_token_ids(tokens, self.config.vocab_size, what)

  def __call__(self, inputs_BxT, targets_BxT) -> tuple[np.ndarray, np.ndarray]:
    """(log p(target), target is the argmax) per position, as numpy [batch, seq]."""
    self.check_tokens(inputs_BxT)
    self.check_tokens(targets_BxT)
    logp, greedy = _score(self.state, jnp.asarray(inputs_BxT, jnp.int32),
                          jnp.asarray(targets_BxT, jnp.int32), **self.static)
    return np.asarray(logp), np.asarray(greedy)

  def logits(self, inputs_BxT) -> jax.Array:
    return model_logits(self.state, jnp.asarray(inputs_BxT, jnp.int32), **self.static)


def checkpoint_dir(path: str, flag: str = "path") -> str:
  """`path` (user-expanded) if it is a directory; else an error naming `flag` (--checkpoint,
  pretrained)."""
  full = os.path.expanduser(path or "")
  if not path or not os.path.isdir(full):
    state = "is a file" if os.path.isfile(full) else "does not exist"
    raise FileNotFoundError(f"{flag}={path!r} {state}; give an lckv-jax model checkpoint "
                            "directory (config.json and params/)")
  return full


def check_passes(forward_passes: int | None, backward_passes: int | None) -> None:
  """Fails before compiling on pass counts the model would reject (None = the model's)."""
  for name, v, low in (("forward_passes", forward_passes, 0),
                       ("backward_passes", backward_passes, 1)):
    if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low):
      raise ValueError(f"{name} must be an integer >= {low} (or None for the model's), got {v!r}")


def check_token_ids(tokens, vocab_size: int, what: str = "token ids") -> None:
  """Ids outside the embedding table would be clamped or wrap silently on the device."""
  tokens = np.asarray(tokens)
  if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{what}: dtype {tokens.dtype}, not integer token ids")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    bad = tokens.min() if tokens.min() < 0 else tokens.max()
    raise ValueError(f"{what}: id {bad} is outside 0..{vocab_size - 1} (model.vocab_size="
                     f"{vocab_size}); were they made by this model's tokenizer?")


def check_context(config, context_len: int, stride: int | None = None) -> None:
  """`context_len` within 1..max_position_embeddings (past it positions extrapolate silently)
  and `stride` within 1..context_len."""
  limit = config.max_position_embeddings
  if not isinstance(context_len, (int, np.integer)) or not 1 <= context_len <= limit:
    raise ValueError(f"context_len={context_len!r} must be in 1..{limit} (the model's "
                     f"max_position_embeddings={limit})")
  if stride is not None and not 1 <= stride <= context_len:
    raise ValueError(f"stride={stride!r} must be in 1..context_len={context_len}")


def bucket(n: int) -> int:
  """The next power of two >= n, at least 8: padded lengths, to bound the compilations."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def windows(num_tokens: int, context_len: int, stride: int | None = None
            ) -> list[tuple[int, int, int]]:
  """The windows `(start, end, first_target)` covering targets 1..num_tokens-1 once each.

  Inputs are tokens[start:end], targets tokens[start+1:end+1]; the window scores targets with
  index >= first_target.
  """
  stride = context_len if stride is None else stride
  if context_len < 1 or not 1 <= stride <= context_len:
    raise ValueError(f"need context_len >= 1 and 1 <= stride <= context_len, got context_len="
                     f"{context_len}, stride={stride}")
  out, scored, start = [], 0, 0
  while scored < num_tokens - 1:
    end = min(start + context_len, num_tokens - 1)
    out.append((max(0, end - context_len), end, scored + 1))
    scored = end
    start += stride
  return out


def token_logprobs(scorer: Scorer, tokens: Sequence[int], context_len: int,
                   stride: int | None = None, batch_size: int = 1) -> np.ndarray:
  """log p(tokens[t] | window context) for t = 1..N-1 (length N-1), batching the windows.

  Every batch is padded to [batch_size, width], width = min(context_len, a power of two >= the
  longest window), so few shapes compile; the padding sits after the real tokens, which causality
  keeps out of their predictions.
  """
  tokens = np.asarray(tokens, np.int64).reshape(-1)
  n = len(tokens)
  out = np.zeros(max(n - 1, 0), np.float64)
  wins = windows(n, context_len, stride)
  width = min(context_len, bucket(max((e - s for s, e, _ in wins), default=1)))
  for b in range(0, len(wins), batch_size):
    chunk = wins[b:b + batch_size]
    inputs = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    for r, (s, e, _) in enumerate(chunk):
      inputs[r, :e - s] = tokens[s:e]
      targets[r, :e - s] = tokens[s + 1:e + 1]
    logp, _ = scorer(inputs, targets)
    for r, (s, e, first) in enumerate(chunk):
      # Column c predicts target index s + 1 + c.
      out[first - 1:e] = logp[r, first - 1 - s:e - s]
  return out


@dataclasses.dataclass(frozen=True)
class Perplexity:
  nll: float  # total negative log-likelihood (nats) of the scored tokens
  tokens: int  # number of scored tokens

  @property
  def mean_nll(self) -> float:
    return self.nll / max(self.tokens, 1)

  @property
  def ppl(self) -> float:
    return math.exp(self.mean_nll)


def perplexity(model_or_scorer, documents, *, context_len: int | None = None,
               stride: int | None = None, prefix_token: int | None = None,
               forward_passes: int | None = None, backward_passes: int | None = None,
               sequential: bool = False, cache_dtype=None, batch_size: int = 1) -> Perplexity:
  """Perplexity of one token array or a list of documents (each scored on its own).

  Args:
    model_or_scorer: a `Transformer` or a `Scorer` (then the pass options are the scorer's).
    documents: a 1-D token array, or a list of them.
    context_len: window length; default min(max_position_embeddings, 2048).
    stride: targets per window after the first; default context_len (chunked).
    prefix_token: prepended to every document so its first token is scored too.
    cache_dtype: with `sequential`, the KV cache's storage (see `Scorer`).
  """
  scorer = model_or_scorer if isinstance(model_or_scorer, Scorer) else Scorer(
      model_or_scorer, forward_passes=forward_passes, backward_passes=backward_passes,
      sequential=sequential, cache_dtype=cache_dtype)
  if context_len is None:
    context_len = min(scorer.config.max_position_embeddings, 2048)
  check_context(scorer.config, context_len, stride)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if isinstance(documents, np.ndarray) and documents.ndim == 1 or (
      len(documents) and np.isscalar(documents[0])):
    documents = [documents]
  docs = []
  for k, doc in enumerate(documents):
    doc = np.asarray(doc).reshape(-1)
    if prefix_token is not None:
      doc = np.concatenate([np.asarray([prefix_token], np.int64), doc])
    scorer.check_tokens(doc, f"document {k}" if len(documents) > 1 else "token ids")
    docs.append(doc.astype(np.int64))
  if sum(max(len(d) - 1, 0) for d in docs) == 0:
    # exp(0 / 0) would read as a perfect perplexity of 1.0.
    raise ValueError(f"no tokens to score: perplexity needs a document of at least 2 tokens "
                     f"(1 with prefix_token), got lengths {[len(d) for d in docs][:8]}")
  nll, count = 0.0, 0
  for doc in docs:
    logp = token_logprobs(scorer, doc, context_len, stride, batch_size)
    nll -= float(logp.sum())
    count += len(logp)
  return Perplexity(nll, count)


def perplexity_of_text(model_or_scorer, tokenizer, text: str, **kwargs) -> Perplexity:
  """`perplexity` of `tokenizer.encode(text)` (a `lckv_jax.tokenizer.Tokenizer`: no BOS is added;
  pass `prefix_token` to score the first token too)."""
  return perplexity(model_or_scorer, np.asarray(tokenizer.encode(text), np.int64), **kwargs)


def _read_tokens(args, path: str, vocab_size: int) -> np.ndarray:
  """The ids to score from --tokens (.npy) or --text_file (tokenized); a clear error if unusable."""
  from lckv_jax import tokenizer as tok_lib
  from lckv_jax.data import sources
  if args.tokens:
    try:
      tokens = np.load(args.tokens, allow_pickle=False)
    except (ValueError, EOFError):
      raise ValueError(f"--tokens={args.tokens!r} is not a .npy file (write one with "
                       "numpy.save)") from None
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
      raise ValueError(f"--tokens={args.tokens!r} must hold a 1-D array of token ids, got "
                       f"shape {getattr(tokens, 'shape', None)}")
    name = where = f"--tokens={args.tokens!r}"
  else:
    tok = (tok_lib.ByteTokenizer() if args.byte_tokenizer
           else tok_lib.load_tokenizer(path, flag="--checkpoint", vocab_size=vocab_size,
                                       transformers=True))
    tokens = np.asarray(tok.encode(sources.read_text(args.text_file)), np.int64)
    name, where = args.text_file, f"{args.text_file} (tokenized)"
  if len(tokens) < 2:
    raise ValueError(f"no tokens to score in {name} ({len(tokens)} token(s); perplexity "
                     "needs at least 2)")
  check_token_ids(tokens, vocab_size, where)
  return tokens


def _check_flags(args, config) -> None:
  if args.context_len is not None:
    check_context(config, args.context_len, args.stride)
  elif args.stride is not None:
    check_context(config, min(config.max_position_embeddings, 2048), args.stride)
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
  check_passes(args.forward_passes, args.backward_passes)
  if args.cache_dtype is not None:
    if not args.sequential:
      raise ValueError("--cache_dtype needs --sequential: the parallel mode reads no KV cache")
    quant.cache_dtype(args.cache_dtype)


def main(argv: Sequence[str] | None = None) -> None:
  from lckv_jax import checkpoint
  p = cli.ArgumentParser(prog=PROG)
  p.add_argument("--checkpoint", required=True, help="lckv-jax model checkpoint directory")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--text_file", help="a UTF-8 text file, tokenized with the checkpoint's tokenizer")
  src.add_argument("--tokens", help="a .npy file of token ids (1-D)")
  p.add_argument("--context_len", type=int, default=None)
  p.add_argument("--stride", type=int, default=None)
  p.add_argument("--forward_passes", type=int, default=None)
  p.add_argument("--backward_passes", type=int, default=None)
  p.add_argument("--sequential", action="store_true", help="exact token-by-token mode")
  p.add_argument("--cache_dtype", default=None,
                 help="with --sequential: the KV cache's storage, int8, fp8 or a float dtype "
                      "(default the compute dtype)")
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--byte_tokenizer", action="store_true", help="UTF-8 bytes as token ids")
  args = p.parse_args(argv)
  path = checkpoint_dir(args.checkpoint, "--checkpoint")
  for flag, f in (("--tokens", args.tokens), ("--text_file", args.text_file)):
    if f and not os.path.isfile(f):  # before the minutes of loading a model
      raise FileNotFoundError(f"{flag}={f!r}: no such file")
  config = checkpoint.load_config(path)
  _check_flags(args, config)
  tokens = _read_tokens(args, path, config.vocab_size)
  model = checkpoint.load_model(path)
  r = perplexity(model, tokens, context_len=args.context_len, stride=args.stride,
                 forward_passes=args.forward_passes, backward_passes=args.backward_passes,
                 sequential=args.sequential, cache_dtype=args.cache_dtype,
                 batch_size=args.batch_size)
  print(f"tokens={r.tokens} nll={r.nll:.4f} mean_nll={r.mean_nll:.4f} ppl={r.ppl:.4f}")


if __name__ == "__main__":
  cli.run(main, prog=PROG)
