"""HuggingFace transformers' `generate` on the same shapes as `benchmarks.decode_speed`: the peer
a user would otherwise run, in its fastest documented setting.

Random bf16 weights of `configs/<shape>.py` as a `LlamaForCausalLM` (the standard model: HF has
no top-down sharing), greedy, B prompts of P random tokens, exactly G new tokens each. Two
settings, each timed warm (after `--warmup` calls with the same shapes; the first call's time,
compile included, is reported beside):

- `eager`: `generate` as it comes (a dynamic cache, no compilation);
- `static`: `cache_implementation="static"`, with which `generate` compiles the decode step
  (`torch.compile`, CUDA graphs: transformers' "LLM inference optimization" guide).

Throughput = B * G / (wall time of one `generate` call), prefill included, as decode_speed's
`tokens_per_s`. Each setting is an entry of `hf_generate_<device>.json` (`benchmarks.records`).

  python -m benchmarks.hf_generate --shape=1b --batch=32 --prompt=512 --gen=256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from benchmarks import records
from benchmarks.common import SHAPES, command, config_path, default_out

SETTINGS = ("eager", "static")


def hf_model(shape: str, max_positions: int, device: str):
  """A randomly initialised `LlamaForCausalLM` of `configs/<shape>.py`'s llama, bf16 on `device`."""
  import torch
  import transformers
  from lckv_jax.config import model_from_file
  from lckv_jax.convert import config_to_hf
  cfg = model_from_file(config_path(shape), layer_types="llama",
                        max_position_embeddings=max_positions)
  hf = {k: v for k, v in config_to_hf(cfg).items()
        if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
  config = transformers.LlamaConfig(**hf)
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
  return model.eval(), config


def run(args, setting: str) -> dict:
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model, config = hf_model(args.shape, args.prompt + args.gen, device)
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt), generator=g).to(device)
  kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen,
            min_new_tokens=args.gen, do_sample=False, pad_token_id=0)
  if setting == "static":
    kw["cache_implementation"] = "static"
    if args.no_compile:  # the CPU test: no compiler toolchain to rely on
      kw["disable_compile"] = True

  def once() -> float:
    if device == "cuda":
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = model.generate(**kw)
    if device == "cuda":
      torch.cuda.synchronize()
    if out.shape != (args.batch, args.prompt + args.gen):  # every row its G tokens: no early stop
      raise RuntimeError(f"generate returned {tuple(out.shape)}, expected "
                         f"{(args.batch, args.prompt + args.gen)}")
    return time.perf_counter() - t0

  first = [once() for _ in range(args.warmup)]
  warm = [once() for _ in range(args.repeats)]
  best = round(min(warm), 6)  # as recorded: the record's tokens/s is its seconds'
  return dict(
      shape=args.shape, layer_types="llama", hf_setting=setting, batch=args.batch,
      prompt=args.prompt, gen=args.gen, compiled=setting == "static" and not args.no_compile,
      dtype="bfloat16", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
      torch=torch.__version__, transformers=transformers.__version__,
      python=platform.python_version(), command=args.command,
      first_call_s=round(first[0], 3) if first else None, warm_s=[round(t, 6) for t in warm],
      seconds=best, median_s=round(statistics.median(warm), 6),
      tokens_per_s=round(args.batch * args.gen / best, 1))


def setting_name(args, setting: str) -> str:
  """'1b_llama_b32_p512_g256_static': shape, sizes, the HF setting."""
  return f"{args.shape}_llama_b{args.batch}_p{args.prompt}_g{args.gen}_{setting}"


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=SHAPES, default="tiny")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=512)
  p.add_argument("--gen", type=int, default=256)
  p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
  p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compiles)")
  p.add_argument("--repeats", type=int, default=3, help="timed calls; the fastest is reported")
  p.add_argument("--no_compile", action="store_true",
                 help="static cache without torch.compile (a machine with no compiler)")
  p.add_argument("--out", default=default_out(),
                 help="folder of the record file (default $OUT, else benchmarks/results)")
  args = p.parse_args(argv)
  if args.repeats < 1 or args.warmup < 0:
    p.error("--repeats must be >= 1 and --warmup >= 0")
  args.command = command("benchmarks.hf_generate", argv)
  entries = []
  for setting in args.settings:
    result = run(args, setting)
    print(json.dumps(result), flush=True)
    entries.append(records.entry(setting_name(args, setting), **result))
  path = records.record_path(args.out, "hf_generate", entries[0]["device"])
  records.update(path, entries)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
