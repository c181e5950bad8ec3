"""The cross-layer KV sharing study: train, score and time every configuration, and show the
trade-off (lckv_jax/train/study.py says what is measured and how).

  python study.py --workdir=/tmp/study                          # the paper's grid, 110M shape
  python study.py --workdir=/tmp/study --grid=llama,sandwich-middle:3,lasagna-bottom:6
  python study.py --workdir=/tmp/study --report_only            # the table and plots again
  python study.py --workdir=/tmp/study --jobs=3                  # 3 configurations at once

Every configuration trains for the same number of steps (--steps, default the config's) in
<workdir>/<name>, through train.py. A configuration in <workdir>/study.json is done and skipped;
an interrupted one resumes from its checkpoint. Outputs: <workdir>/study.json (one entry per
configuration), study.md (the table) and study_*.png (the plots).
"""

from __future__ import annotations

import os

from lckv_jax import cli

PROG = "study.py"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "study_110m.py")


def heldout_documents(config) -> list[str]:
  """The documents the runs hold out (train.py's split of the same source), for the task."""
  from lckv_jax.data import sources
  d = config.data
  if sources.source(d.source).tokens:
    return []
  query = sources.Query(path=d.path, text_field=d.text_field, tfds_name=d.tfds_name,
                        split=d.tfds_train_split, tfds_data_dir=d.tfds_data_dir,
                        max_documents=d.max_documents)
  return sources.split_documents(sources.read_documents(d.source, query), d.eval_fraction)[1]


def visible_gpus() -> tuple[str, ...]:
  """The GPUs this process may use, without starting JAX (the parent of the jobs stays off the
  device): CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists, else none."""
  import shutil
  import subprocess
  if os.environ.get("CUDA_VISIBLE_DEVICES"):
    return tuple(d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d)
  if not shutil.which("nvidia-smi"):
    return ()
  out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
  return tuple(str(i) for i, line in enumerate(out.stdout.splitlines())
               if line.startswith("GPU "))


def apply_sets(config, sets: list[str]):
  """`--set FIELD=VALUE` on the base config (what the timing pass needs to know of the runs;
  train.py reads the same flags itself). A value is read as a Python literal, else a string."""
  import ast
  for s in sets:
    if "=" not in s:
      raise ValueError(f"--set {s!r}: give FIELD=VALUE, e.g. batch_size=16")
    field, text = s.split("=", 1)
    try:
      value = ast.literal_eval({"true": "True", "false": "False"}.get(text.lower(), text))
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = field.split(".")
    node = config
    try:
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise KeyError(field)
      node[leaf] = value
    except KeyError:
      raise ValueError(f"--set {s!r}: the config has no field {field!r}") from None
    except TypeError as e:
      raise ValueError(f"--set {s!r}: {e}") from None
  return config


def main(argv: list[str]) -> int:
  from lckv_jax.train import study
  from lckv_jax.train.config import from_file, model_config
  p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="one folder per configuration, and the records")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="the base config file (default: the "
                 "paper's 110M shape, configs/study_110m.py)")
  p.add_argument("--grid", default="paper",
                 help="'paper' (the standard model, the 9 configurations at each --reductions, "
                 "the LCKV ablations) or a comma-separated list of presets and layer_types")
  p.add_argument("--reductions", default="2,4",
                 help="KV-cache reductions of the paper grid (2: half the layers compute KV)")
  p.add_argument("--baseline_seeds", type=int, default=2,
                 help="runs of the standard model with different seeds (the noise)")
  p.add_argument("--no_ablations", action="store_true",
                 help="leave out the LCKV warm-up and iteration ablations")
  p.add_argument("--steps", type=int, default=None, help="training steps of every configuration")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a train config field for every configuration, e.g. batch_size=16")
  p.add_argument("--cap_bytes", type=int, default=None,
                 help="memory of the decode-throughput runs, in bytes (default: the device's)")
  p.add_argument("--decode_steps", type=int, default=512,
                 help="decode steps timed per throughput run, the rest projected (0: all); "
                 "few steps overstate a long generation's time")
  p.add_argument("--no_throughput", action="store_true",
                 help="skip the speed measurements (training step, prefill, decoding)")
  p.add_argument("--jobs", type=int, default=1,
                 help="configurations trained and scored at once: one per GPU, or sharing the "
                 "GPUs when more (a small model leaves most of a GPU idle); the speeds are "
                 "measured after, one configuration at a time")
  p.add_argument("--devices", default=None,
                 help="comma-separated GPU ids for the jobs (default: the visible GPUs)")
  p.add_argument("--tasks", action="append", default=[],
                 help="a multiple-choice JSONL task file to score as well (repeatable)")
  p.add_argument("--task_examples", type=int, default=200,
                 help="questions of the held-out multiple-choice task")
  p.add_argument("--records", default=None,
                 help="start from this record file (e.g. from another machine): its "
                 "configurations count as done")
  p.add_argument("--max_new", type=int, default=None,
                 help="train at most this many configurations this time (the next run goes on)")
  p.add_argument("--report_only", action="store_true", help="write the table and plots only")
  args = p.parse_args(argv)

  if args.jobs < 1:
    raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
  records_path = os.path.join(args.workdir, study.RECORDS)
  if args.report_only:
    records = study.read_records(records_path)
    if not records:
      raise ValueError(f"--report_only: no records in {records_path}")
  else:
    base = apply_sets(from_file(args.config), args.set)
    num_layers = model_config(base).num_layers
    if args.grid == "paper":
      reductions = [int(r) for r in args.reductions.split(",") if r]
      if any(r < 2 for r in reductions):
        raise ValueError(f"--reductions must be integers >= 2, got {args.reductions!r}")
      entries = study.grid(num_layers, reductions, args.baseline_seeds, not args.no_ablations,
                           base_forward_passes=model_config(base).forward_passes)
    else:
      entries = study.custom_grid([s for s in args.grid.split(",") if s], num_layers)
    os.makedirs(args.workdir, exist_ok=True)
    if args.records:  # configurations measured elsewhere count as done (ours win a tie)
      mine = study.read_records(records_path)
      study.write_records(records_path, {**study.read_records(args.records), **mine})
    task_files = list(args.tasks)
    docs = heldout_documents(base)
    if docs:
      task_files.insert(0, study.heldout_task(
          docs, os.path.join(args.workdir, "heldout_continuation.jsonl"), n=args.task_examples))
    settings = study.Settings(
        config=args.config, workdir=args.workdir,
        steps=args.steps or base.steps, train_args=tuple(f"--config.{s}" for s in args.set),
        cap_bytes=args.cap_bytes, decode_steps=args.decode_steps or None,
        throughput=not args.no_throughput, log=lambda s: print(s, flush=True),
        train_shape=study.TrainShape(
            batch=base.batch_size, seq=base.seq_len, dtype=base.model.dtype,
            remat=base.model.remat, forward_passes=base.model.forward_passes,
            backward_passes=base.model.backward_passes),
        jobs=args.jobs, devices=tuple(d for d in (args.devices or "").split(",") if d)
        or visible_gpus())
    records = study.run(entries, settings, task_files, args.max_new)
  for path in study.report(records, args.workdir):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  cli.run(main, prog=PROG)
