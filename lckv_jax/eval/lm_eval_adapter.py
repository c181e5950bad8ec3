"""An EleutherAI lm-evaluation-harness model for lckv-jax checkpoints.

    import lckv_jax.eval.lm_eval_adapter  # registers the model name `lckv_jax`
    lm_eval.simple_evaluate(model="lckv_jax",
                            model_args="pretrained=DIR,forward_passes=7,backward_passes=2",
                            tasks=["hellaswag"])

`LCKVEvalModel` implements the three request types on any lckv-jax `Transformer` and any
`lckv_jax.tokenizer.Tokenizer` (a transformers tokenizer is seen through that protocol; UTF-8
bytes by default). Text is scored as given: no BOS is added, and an empty context or a rolling
window starts from `tokenizer.prefix_id` (BOS, else EOS, else 0). It needs no lm_eval; `LCKVLM`
wraps it as an `lm_eval.api.model.LM` and is only defined when lm_eval is importable (an optional
dependency).

- `loglikelihood`: (context, continuation) -> (sum log p(continuation), is greedy), scored in one
  parallel forward over context + continuation (truncated on the left to `max_length` + 1).
- `loglikelihood_rolling`: the perplexity code's windows (`perplexity.token_logprobs`, chunked,
  with the prefix token), so it equals `-perplexity(...).nll` of the same tokens.
- `generate_until`: greedy. `decoder="generation"` uses `lckv_jax.generation.generate` (prefill
  with the iteration plan, then exact cached decoding, docs/spec.md §5); `decoder="parallel"`
  re-runs the full parallel forward over a fixed buffer for each new token (a jitted loop: no cache,
  quadratic in the generated length; for cyclic layer types each step is the iteration plan over
  the whole sequence, not cached decoding). `"auto"` (default) takes `generation` when importable.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lckv_jax import tokenizer as tok_lib
from lckv_jax.eval import perplexity as ppl_lib

log = logging.getLogger(__name__)


def check_options(config, max_length: int | None, batch_size: int, max_gen_toks: int = 0) -> None:
  """Options against the model's config: past max_position_embeddings positions extrapolate
  silently, so a longer `max_length` is an error."""
  limit, is_int = config.max_position_embeddings, lambda v: isinstance(v, (int, np.integer))
  if max_length is not None and (not is_int(max_length) or not 1 <= max_length <= limit):
    raise ValueError(f"max_length={max_length!r} must be in 1..{limit} (the model's "
                     f"max_position_embeddings={limit})")
  if not is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  if not is_int(max_gen_toks) or max_gen_toks < 0:
    raise ValueError(f"max_gen_toks must be an integer >= 0, got {max_gen_toks!r}")


def _args(request) -> tuple:
  """lm_eval `Instance` objects carry `.args`; plain tuples are accepted too."""
  return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _bucket(n: int, cap: int) -> int:
  """Padded length: the next power of two >= n (at least 8), at most `cap`."""
  return min(cap, ppl_lib.bucket(n))


@functools.partial(jax.jit, static_argnames=("steps",) + ppl_lib._STATIC)
def _greedy_loop(state, buf_1xS, length, *, steps, **static):
  """Writes `steps` greedy tokens after the first `length` of the buffer, one full parallel
  forward per token (a stand-in for cached decoding)."""
  def body(i, buf):
    logits_1xSxV = ppl_lib.model_logits(state, buf, **static)
    nxt = jnp.argmax(logits_1xSxV[0, length + i - 1]).astype(buf.dtype)
    return buf.at[0, length + i].set(nxt)
  return jax.lax.fori_loop(0, steps, body, buf_1xS)


class LCKVEvalModel:
  """lm-eval's three request types over an lckv-jax model, without depending on lm_eval.

  Args:
    model: a `Transformer`.
    tokenizer: a `lckv_jax.tokenizer.Tokenizer` (or a transformers tokenizer); default bytes.
    max_length: longest scored sequence; default min(max_position_embeddings, 2048).
    batch_size: requests per forward.
    forward_passes, backward_passes: iteration plan of cyclic layer types (model defaults).
    sequential: use the exact token-by-token mode instead.
    max_gen_toks: default generation length of `generate_until`.
    prefix_token_id: context of an empty context and of rolling windows; default
      `tokenizer.prefix_id` (BOS, else EOS, else 0).
    decoder: greedy decoding of `generate_until`: 'auto', 'generation' or 'parallel' (above).
  """

  def __init__(self, model, tokenizer=None, *, max_length: int | None = None,
               batch_size: int = 8, forward_passes: int | None = None,
               backward_passes: int | None = None, sequential: bool = False,
               max_gen_toks: int = 256, prefix_token_id: int | None = None,
               decoder: str = "auto"):
    self.model = model
    self.tokenizer = tok_lib.as_tokenizer(tokenizer if tokenizer is not None
                                          else tok_lib.ByteTokenizer())
    cfg = model.config
    check_options(cfg, max_length, batch_size, max_gen_toks)
    self.max_length = min(cfg.max_position_embeddings, 2048) if max_length is None else max_length
    self.batch_size = int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self.scorer = ppl_lib.Scorer(model, forward_passes=forward_passes,
                                 backward_passes=backward_passes, sequential=sequential)
    self.prefix_token_id = (tok_lib.prefix_id(self.tokenizer) if prefix_token_id is None
                            else int(prefix_token_id))
    eos = self.tokenizer.eos_id
    self.eos_token_id = None if eos is None else int(eos)
    if decoder not in ("auto", "generation", "parallel"):
      raise ValueError(f"decoder must be 'auto', 'generation' or 'parallel', got {decoder!r}")
    if decoder == "auto":
      try:
        from lckv_jax import generation  # noqa: F401  (another module; may be absent)
        decoder = "generation"
      except ImportError:
        decoder = "parallel"
    self.decoder = decoder

  @classmethod
  def from_checkpoint(cls, path: str, tokenizer=None, dtype: str | None = None, *,
                      flag: str = "path", **kwargs):
    """`flag` names `path`'s setting in errors (`--checkpoint`, `pretrained`)."""
    from lckv_jax import checkpoint
    path = ppl_lib.checkpoint_dir(path, flag)
    if tokenizer is None:
      tokenizer = tok_lib.load_tokenizer(path, flag=flag, transformers=True,
                                         vocab_size=checkpoint.load_config(path).vocab_size)
    model = checkpoint.load_model(path, **({"dtype": dtype} if dtype else {}))
    return cls(model, tokenizer, **kwargs)

  # -- tokens ----------------------------------------------------------------------------------

  def tok_encode(self, text: str) -> list[int]:
    return [int(i) for i in self.tokenizer.encode(text)]

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids])

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of context + continuation beyond the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      continuation = context[-n_spaces:] + continuation
      context = context[:-n_spaces]
    whole = self.tok_encode(context + continuation)
    ctx = self.tok_encode(context)
    return ctx, whole[len(ctx):]

  # -- requests --------------------------------------------------------------------------------

  def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    pairs = []
    for r in requests:
      context, continuation = _args(r)[:2]
      if context:
        ctx, cont = self._encode_pair(context, continuation)
      else:
        ctx, cont = [self.prefix_token_id], self.tok_encode(continuation)
      pairs.append((ctx, cont))
    return self.loglikelihood_tokens(pairs)

  def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                           ) -> list[tuple[float, bool]]:
    """Token-level `loglikelihood`: (context ids, continuation ids) pairs, context non-empty."""
    rows = []
    for ctx, cont in pairs:
      if not cont:
        raise ValueError("loglikelihood: the continuation encodes to no tokens")
      if not ctx:
        ctx = [self.prefix_token_id]
      whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
    results: list[Any] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for b in range(0, len(order), self.batch_size):
      idx = order[b:b + self.batch_size]
      width = _bucket(max(len(rows[i][0]) for i in idx), self.max_length)
      inputs = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      for r, i in enumerate(idx):
        inp, tgt, _ = rows[i]
        inputs[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      logp, greedy = self.scorer(inputs, targets)
      for r, i in enumerate(idx):
        n, k = len(rows[i][0]), rows[i][2]
        results[i] = (float(logp[r, n - k:n].sum()), bool(greedy[r, n - k:n].all()))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
    out = []
    for r in requests:
      (text,) = _args(r)[:1]
      tokens = [self.prefix_token_id] + self.tok_encode(text)
      logp = ppl_lib.token_logprobs(self.scorer, tokens, self.max_length, None, self.batch_size)
      out.append(float(logp.sum()))
    return out

  def greedy_tokens(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Up to `max_new_tokens` greedy tokens after `prompt` (the parallel decoder does not stop
    at EOS; `generate_until` cuts there)."""
    prompt = list(prompt)[-max(self.max_length - max_new_tokens, 1):] or [self.prefix_token_id]
    steps = min(max_new_tokens, self.max_length - len(prompt))
    if steps <= 0:
      return []
    self.scorer.check_tokens(prompt, "prompt")
    if self.decoder == "generation":
      from lckv_jax import generation
      out = generation.generate(self.model, [prompt], max_new_tokens=steps,
                                eos_id=self.eos_token_id, max_len=len(prompt) + steps)
      return [int(t) for t in out.tokens[0]]
    width = _bucket(len(prompt) + steps, self.max_length)
    buf = np.zeros((1, width), np.int32)
    buf[0, :len(prompt)] = prompt
    self.scorer.check_tokens(buf)
    out = _greedy_loop(self.scorer.state, jnp.asarray(buf), len(prompt), steps=steps,
                       **self.scorer.static)
    return [int(t) for t in np.asarray(out)[0, len(prompt):len(prompt) + steps]]

  def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
    out = []
    for r in requests:
      context, gen_kwargs = (_args(r) + ({},))[:2]
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature", 0.0) > 0:
        log.warning("generate_until: sampling requested; lckv_jax generates greedily")
      max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
      ids = self.greedy_tokens(self.tok_encode(context) or [self.prefix_token_id], max_new)
      if self.eos_token_id is not None and self.eos_token_id in ids:
        ids = ids[:ids.index(self.eos_token_id)]
      text = self.tok_decode(ids)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out


try:  # lm_eval is optional: the model name is registered only when it is installed.
  from lm_eval.api.model import LM as _LM
  from lm_eval.api.registry import register_model as _register_model
except ImportError:  # pragma: no cover - depends on the environment
  _LM = None

if _LM is not None:

  @_register_model("lckv_jax")
  class LCKVLM(_LM):
    """`lm_eval --model lckv_jax --model_args pretrained=DIR[,forward_passes=..,batch_size=..]`."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, batch_size=8,
                 max_length=None, forward_passes=None, backward_passes=None,
                 sequential=False, max_gen_toks=256, dtype=None, **kwargs):
      super().__init__()
      if kwargs:
        log.info("lckv_jax: ignoring model_args %s", sorted(kwargs))
      as_int = lambda v: None if v in (None, "", "None") else int(v)
      tok = (None if not tokenizer else
             tok_lib.load_tokenizer(tokenizer, flag="tokenizer", transformers=True))
      self.impl = LCKVEvalModel.from_checkpoint(
          pretrained, tok, dtype=dtype, flag="pretrained",
          batch_size=as_int(batch_size) if str(batch_size).isdigit() else 8,
          max_length=as_int(max_length), forward_passes=as_int(forward_passes),
          backward_passes=as_int(backward_passes),
          sequential=str(sequential).lower() in ("1", "true"), max_gen_toks=int(max_gen_toks))

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      return self.impl.loglikelihood(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      return self.impl.loglikelihood_rolling(requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
      return self.impl.generate_until(requests)
