"""The cross-layer KV sharing study in one command: train, score and time every configuration.

    python study.py --config=configs/study_110m.py --workdir=/tmp/study [--grid=paper]

The NAACL 2025 study (docs/spec.md §2) trains every configuration of its framework at one budget
and compares language-modelling quality, downstream accuracy, generation throughput, prefill
latency and training cost. `run` does that for a grid of `Entry`s:

1. trains each in its own workdir with `train.py` (a subprocess; the same token budget for all;
   a configuration already in the record file is skipped, an interrupted one resumes from its
   checkpoint, as train.py does);
2. measures it, each in a subprocess too, so one configuration's memory never reaches the next:
   held-out loss and perplexity
   (`train.py --mode=evaluate`: the parallel iteration plan, and for a configuration with a cycle
   the exact sequential model as well), a multiple-choice task (continuations of held-out
   passages, made from the held-out documents; `--tasks` adds the user's), KV-cache bytes per
   token, training tokens/s (the median of the run's logged steps); then, for all trained
   configurations, one process at a time on the device: the training step's time alone
   (`benchmarks.train_speed`: the training cost), prefill latency and decode throughput at the
   largest batch under a memory cap for a short and a long prompt (`benchmarks.throughput`);
3. writes one record file (`study.json`: one entry per configuration), a markdown table
   (`study.md`) and plots (`study_*.png`).

Training and evaluation go through train.py's own code, so a study run gets its checks: locks,
divergence, damaged checkpoints, memory before compiling.

`jobs` configurations train and are scored at once, each on its own GPU where there are as many
(`devices`), else sharing them: a 110M model leaves most of an H200 idle, and much of a
configuration's time is start-up and compilation on the host. Their logged tokens/s are then
shared-device numbers (`train_shared_device`), which is why the training cost comes from the
timing pass above, where each configuration has the device to itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

from lckv_jax import layer_types as lt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORDS = "study.json"

# The paper's two decode settings (prompt + generated tokens), and the rows of the
# prefill-latency run (of the longest prompt).
DECODE_SETTINGS = ((5, 2043), (512, 1024))
PREFILL_ROWS = 16


@dataclasses.dataclass(frozen=True)
class Entry:
  """One configuration of the study: a name, its layer_types and what else it changes."""
  name: str
  layer_types: str
  group: str  # 'baseline', '2x', 'Nx' (a reduction), 'warm-up', 'iterations'
  overrides: tuple[tuple[str, object], ...] = ()  # train config fields, e.g. (('seed', 1),)

  @property
  def kv_layers(self) -> int:
    n = len(self.layer_types.split("_"))
    return len(lt_lib.parse(self.layer_types, n).kv_layers)

  @property
  def cyclic(self) -> bool:
    n = len(self.layer_types.split("_"))
    return lt_lib.parse(self.layer_types, n).has_cycle


def grid(num_layers: int, reductions: Sequence[int] = (2, 4), baseline_seeds: int = 2,
         ablations: bool = True, forward_passes: Sequence[int] = (2, 4, 7),
         warmups: Sequence[int] = (0, 2, 4), base_forward_passes: int | None = None
         ) -> list[Entry]:
  """The study's grid for a model of `num_layers` layers.

  The standard model (`baseline_seeds` seeds, which shows the seed-to-seed noise); the nine
  {pizza, sandwich, lasagna} x {bottom, top, middle} configurations at each KV-cache reduction
  (2: half the layers compute KV); the LCKV ablations: warm-up layers (`lckv:w`) and the
  iterations m (`forward_passes`). A configuration whose string another entry already has runs
  once (e.g. lasagna-middle is lasagna-bottom with groups of 2), and so does the iteration
  ablation at the base config's m (`base_forward_passes`): it is `lckv:2` itself.
  """
  entries = [Entry("llama" + (f"-seed{s}" if s else ""), lt_lib.llama(num_layers), "baseline",
                   (("seed", s),) if s else ()) for s in range(baseline_seeds)]
  # The authors' recommendation and the existing methods first (sandwich-middle, CLA =
  # lasagna-bottom, YOCO = pizza-bottom, LCKV = sandwich-top), so that a partial run (the
  # runner resumes) has the comparisons that matter most.
  first = ("sandwich-middle", "lasagna-bottom", "pizza-bottom", "sandwich-top")
  order = list(first) + [n for n in lt_lib.STUDY_PRESETS if n not in first]
  for r in reductions:
    kv = max(2, num_layers // r)
    for name in order:
      entries.append(Entry(f"{name}:{kv}", lt_lib.resolve(f"{name}:{kv}", num_layers), f"{r}x"))
  if ablations:
    for w in (w for w in warmups if w < num_layers):
      entries.append(Entry(f"lckv:{w}", lt_lib.lckv(num_layers, w), "warm-up"))
    for m in forward_passes:
      entries.append(Entry(f"lckv:2 m={m}", lt_lib.lckv(num_layers, 2), "iterations",
                           () if m == base_forward_passes else (("model.forward_passes", m),)))
  return dedupe(entries)


def dedupe(entries: Sequence[Entry]) -> list[Entry]:
  """Entries with a distinct (layer_types, overrides), the first name kept."""
  seen, out = set(), []
  for e in entries:
    key = (e.layer_types, e.overrides)
    if key not in seen:
      seen.add(key)
      out.append(e)
  return out


def custom_grid(specs: Sequence[str], num_layers: int) -> list[Entry]:
  """Entries from `--grid=a,b,...`: presets (`sandwich-middle:3`) or literal strings."""
  out = []
  for s in specs:
    lt = str(lt_lib.parse(lt_lib.resolve(s, num_layers), num_layers))  # errors before training
    out.append(Entry(s, lt, "baseline" if lt == lt_lib.llama(num_layers) else "custom"))
  return dedupe(out)


def slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


# ---------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------


def read_records(path: str) -> dict[str, dict]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    rows = json.load(f)
  return {r["name"]: r for r in rows}


def write_records(path: str, records: dict[str, dict]) -> None:
  """Atomically: an interrupted write never loses the configurations measured before."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(list(records.values()), f, indent=1)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Running one configuration.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainShape:
  """What the training-step timing runs: the study's batch, length, dtype, remat and plan."""
  batch: int
  seq: int
  dtype: str = "bfloat16"
  remat: str = "none"
  forward_passes: int = 7  # m, unless an entry overrides it
  backward_passes: int = 2  # b


@dataclasses.dataclass
class Settings:
  config: str  # configs/<shape>.py
  workdir: str
  steps: int
  train_args: tuple[str, ...] = ()  # more --config.* flags for every configuration
  train_shape: TrainShape | None = None  # None: no training-step timing pass
  jobs: int = 1  # configurations trained and scored at once
  devices: tuple[str, ...] = ()  # GPUs to spread the jobs over (CUDA_VISIBLE_DEVICES); ()=all
  cap_bytes: int | None = None  # memory cap of the decode-throughput runs
  # Decode steps timed (the rest projected at the measured roofline fraction); None: all. Too
  # few overstate a long generation: the first steps are overhead-bound (H200, 110M llama,
  # 5+2043: 32 steps projected 5,805 tok/s, 512 steps 42,600).
  decode_steps: int | None = 512
  throughput: bool = True
  python: str = sys.executable
  log: Callable[[str], None] = print


def budget(settings: Settings) -> dict:
  """What every configuration of one study shares: the base config, the steps and the extra
  config flags (the token budget and the recipe). Each record keeps it."""
  return dict(config=os.path.basename(settings.config), steps=settings.steps,
              train_args=list(settings.train_args))


def check_budget(records: dict[str, dict], settings: Settings, path: str) -> None:
  """Raises if a record of `path` was trained with another budget than `settings` ask for: a
  table mixing 300-step and 2,000-step runs would compare nothing, silently. A field an old
  record lacks is not compared."""
  want = budget(settings)
  for name, rec in records.items():
    for key, value in want.items():
      if key in rec and rec[key] != value:
        raise ValueError(
            f"study: {name!r} in {path} was trained with {key}={rec[key]!r}, this run asks for "
            f"{key}={value!r}; every configuration of a study has the same budget: give the "
            "flags it was started with (--config, --steps, --set), or another --workdir")


def _config_flags(settings: Settings, entry: Entry) -> list[str]:
  flags = [f"--config={settings.config}", f"--config.model.layer_types={entry.layer_types}",
           f"--config.steps={settings.steps}", *settings.train_args]
  flags += [f"--config.{k}={v}" for k, v in entry.overrides]
  return flags


def _run(cmd: list[str], settings: Settings, capture: bool = False, env=None,
         log_file: str | None = None) -> str:
  """Runs a command from the repository root; its output passes through unless captured (or
  written to `log_file`)."""
  if log_file:
    with open(log_file, "a", encoding="utf-8") as f:
      out = subprocess.run(cmd, cwd=ROOT, text=True, env=env, stdout=f, stderr=subprocess.STDOUT)
    if out.returncode != 0:
      with open(log_file, encoding="utf-8", errors="replace") as f:
        tail = f.read()[-2000:]
      raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {out.returncode}; {log_file} ended:\n"
                         f"{tail}")
    return ""
  out = subprocess.run(cmd, cwd=ROOT, text=True, env=env,
                       stdout=subprocess.PIPE if capture else None)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {out.returncode}"
                       + (f"; its output ended:\n{out.stdout[-2000:]}" if capture else ""))
  return out.stdout or ""


def job_env(slot: int, settings: Settings) -> dict | None:
  """The environment of the job in `slot`: its GPU when there are several, and no
  preallocation when jobs share a device (JAX would otherwise take 75% of it for each)."""
  if settings.jobs <= 1:
    return None
  env = dict(os.environ)
  if settings.devices:
    env["CUDA_VISIBLE_DEVICES"] = settings.devices[slot % len(settings.devices)]
  if shared_devices(settings):
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


def shared_devices(settings: Settings) -> bool:
  return settings.jobs > max(1, len(settings.devices))


def _json_lines(text: str) -> list[dict]:
  rows = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def train_tokens_per_s(workdir: str) -> dict:
  """Median training tokens/s of a run's logged steps (the first log excluded: it holds the
  compile), and the last logged loss."""
  rows = []
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if "tokens_per_s" in r:
        rows.append(r)
  rows = rows[1:] or rows
  if not rows:
    return {}
  tps = sorted(r["tokens_per_s"] for r in rows)
  med = tps[len(tps) // 2]
  return dict(train_tokens_per_s=med, train_loss=rows[-1].get("loss"))


def measure_throughput(entries: Sequence[Entry], settings: Settings, shape: str,
                       per_process: int = 6) -> Iterator[dict[str, dict]]:
  """Decode tokens/s at the largest batch under the cap for each decode setting, and the
  prefill latency of `PREFILL_ROWS` rows of the longest prompt, per entry name
  (`benchmarks.throughput`: random weights of the trained shape, since speed does not depend on
  them). One subprocess per setting runs up to `per_process` configurations of the same prefill
  iterations in turn (one start-up, one measurement of the ceilings); yields what each
  subprocess measured as soon as it ends, so that an interrupted study keeps it."""
  by_iterations: dict[int | None, list[Entry]] = {}
  for e in entries:
    m = dict(e.overrides).get("model.forward_passes")
    by_iterations.setdefault(None if m is None else m + 2, []).append(e)  # m + b, b = 2
  longest = max(p + g for p, g in DECODE_SETTINGS) - 2
  runs = [(f"decode_{p}+{g}", [f"--prompt={p}", f"--gen={g}", "--batch", "--max_batch"]
           + ([f"--decode_steps={settings.decode_steps}"] if settings.decode_steps else []))
          for p, g in DECODE_SETTINGS]
  # 16 rows of the longest prompt, the last of 3 runs: one row of a small model is launch
  # overhead (H200, 110M, 2,046 tokens: 18-34 ms whatever the configuration), and a first run
  # pays one-time costs that compile events miss.
  runs.append(("prefill", [f"--prompt={longest}", "--gen=2", "--batch", str(PREFILL_ROWS),
                           "--repeats=3"]))
  for iterations, entries_m in by_iterations.items():
    for i in range(0, len(entries_m), per_process):
      group = entries_m[i:i + per_process]
      strings = list(dict.fromkeys(e.layer_types for e in group))
      base = [settings.python, "-m", "benchmarks.throughput", f"--shape={shape}",
              "--layer_types", *strings, "--repeats=1",
              f"--out={os.path.join(settings.workdir, 'throughput')}",
              f"--ceilings={os.path.join(settings.workdir, 'ceilings.json')}"]
      if settings.cap_bytes:
        base.append(f"--cap_bytes={settings.cap_bytes}")
      if iterations:
        base.append(f"--prefill_iterations={iterations}")
      for key, flags in runs:
        try:
          printed = _run(base + flags, settings, capture=True)
        except RuntimeError as e:  # e.g. not even batch 1 fits the cap: the others still run
          settings.log(f"throughput {key} of {', '.join(e.name for e in group)}: {e}")
          continue
        out: dict[str, dict] = {}
        for r in _json_lines(printed):
          lt = r.get("label", "").split(" ", 1)[-1]
          for e in group:
            if e.layer_types != lt:
              continue
            if key == "prefill":
              out.setdefault(e.name, {}).update(
                  prefill_latency_s=r["prefill_s"], prefill_tokens=longest,
                  prefill_rows=PREFILL_ROWS)
            else:
              out.setdefault(e.name, {})[key] = dict(
                  batch=r["batch"], tokens_per_s=r["tokens_per_s"],
                  decode_tokens_per_s=r["decode_tokens_per_s"])
        yield out


def measure(entry: Entry, settings: Settings, task_files: Sequence[str], env=None) -> dict:
  """Everything the study compares for one trained configuration (but the speeds)."""
  wd = os.path.join(settings.workdir, slug(entry.name))
  flags = _config_flags(settings, entry)
  train = [settings.python, "train.py", f"--workdir={wd}", *flags]
  rec = dict(name=entry.name, layer_types=entry.layer_types, group=entry.group,
             overrides=dict(entry.overrides), kv_layers=entry.kv_layers, cyclic=entry.cyclic,
             **budget(settings))
  ev = _json_lines(_run(train + ["--mode=evaluate"], settings, capture=True, env=env))
  if ev:
    rec.update(eval_loss=ev[-1]["eval_loss"], eval_ppl=ev[-1]["eval_ppl"],
               eval_tokens=ev[-1].get("eval_tokens"))
  if entry.cyclic:  # the exact model: one token at a time, each seeing earlier tokens' KV
    ev = _json_lines(_run(train + ["--mode=evaluate", "--config.model.use_sequential=True"],
                          settings, capture=True, env=env))
    if ev:
      rec.update(eval_loss_sequential=ev[-1]["eval_loss"],
                 eval_ppl_sequential=ev[-1]["eval_ppl"])
  rec.update(train_tokens_per_s(wd))
  if shared_devices(settings):
    rec["train_shared_device"] = True  # the logged tokens/s: not the training cost
  from lckv_jax import checkpoint  # reads config.json only: this process stays off the device
  cfg = checkpoint.load_config(os.path.join(wd, "model"))
  rec.update(kv_bytes_per_token=cfg.kv_cache_bytes_per_token(), num_layers=cfg.num_layers)
  if task_files:
    cmd = [settings.python, "-m", "lckv_jax.eval.multiple_choice",
           f"--checkpoint={os.path.join(wd, 'model')}"]
    for t in task_files:
      cmd.append(f"--tasks={t}")
    rec["tasks"] = {r["task"]: dict(acc=r["acc"], acc_norm=r["acc_norm"], n=r["n"])
                    for r in _json_lines(_run(cmd, settings, capture=True, env=env))
                    if "task" in r}
  return rec


def measure_train_speed(entries: Sequence[Entry], settings: Settings, shape: str
                        ) -> dict[str, dict]:
  """The training step's time of each entry alone on the device (`benchmarks.train_speed`: the
  study's batch, length and plan, random tokens): one process per iteration count m, which
  compiles its configurations side by side and times them one after the other."""
  ts = settings.train_shape
  out: dict[str, dict] = {}
  by_m: dict[int, list[Entry]] = {}
  for e in entries:
    by_m.setdefault(int(dict(e.overrides).get("model.forward_passes", ts.forward_passes)),
                    []).append(e)
  for m, group in by_m.items():
    strings = list(dict.fromkeys(e.layer_types for e in group))
    cmd = [settings.python, "-m", "benchmarks.train_speed", f"--shape={shape}",
           "--layer_types", *strings, f"--m={m}", f"--b={ts.backward_passes}",
           f"--batch={ts.batch}", f"--seq={ts.seq}", f"--dtype={ts.dtype}",
           f"--remat={ts.remat}", "--steps=10", f"--tag=m{m}",
           f"--out={os.path.join(settings.workdir, 'train_speed')}"]
    try:
      printed = _run(cmd, settings, capture=True)
    except RuntimeError as e:
      settings.log(f"training-step timing of {', '.join(e.name for e in group)}: {e}")
      continue
    for r in _json_lines(printed):
      for e in group:
        if e.layer_types == r.get("layer_types") and "step_s" in r:
          out[e.name] = dict(train_step_s=r["step_s"], train_speed_tokens_per_s=r["tokens_per_s"],
                             train_mfu=r.get("mfu"))
  return out


def _train_and_measure(n: int, total: int, entry: Entry, settings: Settings,
                       task_files: Sequence[str], slot: int) -> dict:
  wd = os.path.join(settings.workdir, slug(entry.name))
  env = job_env(slot, settings)
  where = (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env and "CUDA_VISIBLE_DEVICES" in env
           else "")
  settings.log(f"[{n}/{total}] {entry.name} ({entry.group}): layer_types="
               f"{entry.layer_types}, {entry.kv_layers} KV layers"
               + (", iterative" if entry.cyclic else "")
               + (" (resuming)" if os.path.isdir(os.path.join(wd, "checkpoints")) else "")
               + where)
  t0 = time.time()
  if not os.path.exists(os.path.join(wd, "model", "config.json")):
    # Alone, train.py draws its progress bar (step, loss, tokens/s) under this line; beside
    # other jobs it writes to <workdir>/<name>.log instead.
    log_file = None
    if settings.jobs > 1:
      log_file = os.path.join(settings.workdir, slug(entry.name) + ".log")
      settings.log(f"[{n}/{total}] {entry.name}: training, progress in {log_file}")
    _run([settings.python, "train.py", f"--workdir={wd}", *_config_flags(settings, entry)],
         settings, env=env, log_file=log_file)
  t1 = time.time()
  settings.log(f"[{n}/{total}] {entry.name}: trained in {t1 - t0:,.0f} s; measuring")
  rec = measure(entry, settings, task_files, env)
  rec.update(train_wall_s=round(t1 - t0, 1), measure_wall_s=round(time.time() - t1, 1))
  settings.log(f"[{n}/{total}] {entry.name}: " + summary_line(rec))
  return rec


def run(entries: Sequence[Entry], settings: Settings, task_files: Sequence[str] = (),
        max_new: int | None = None) -> dict:
  """Trains and measures every entry not yet in the record file (at most `max_new` of them this
  time, `settings.jobs` at once), then times the training step, prefill and decoding of those
  without timings, one at a time; returns the records."""
  os.makedirs(settings.workdir, exist_ok=True)
  path = os.path.join(settings.workdir, RECORDS)
  records = read_records(path)
  check_budget(records, settings, path)
  todo = [e for e in entries if e.name not in records]
  settings.log(f"study: {len(entries)} configurations, {len(entries) - len(todo)} done, "
               f"{len(todo)} to run ({settings.steps} steps each) in {settings.workdir}"
               + (f"; {max_new} this time" if max_new is not None and max_new < len(todo)
                  else "")
               + (f"; {settings.jobs} at once" if settings.jobs > 1 else ""))
  todo = todo[:max_new] if max_new is not None else todo
  work: queue.Queue = queue.Queue()
  for n, entry in enumerate(entries, 1):
    if entry in todo:
      work.put((n, entry))
  lock = threading.Lock()
  failures: list[BaseException] = []

  def worker(slot: int) -> None:
    while not failures:
      try:
        n, entry = work.get_nowait()
      except queue.Empty:
        return
      try:
        rec = _train_and_measure(n, len(entries), entry, settings, task_files, slot)
      except BaseException as e:  # noqa: BLE001 - stop the other jobs taking new work; re-raised
        failures.append(e)
        return
      with lock:  # one writer at a time; each write keeps every record so far
        records[entry.name] = rec
        write_records(path, records)

  if settings.jobs <= 1:
    worker(0)
  else:
    threads = [threading.Thread(target=worker, args=(slot,), daemon=True)
               for slot in range(min(settings.jobs, len(todo)))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  if failures:
    raise failures[0]
  shape = os.path.splitext(os.path.basename(settings.config))[0]
  if settings.throughput and settings.train_shape:
    untimed = [e for e in entries if e.name in records
               and "train_speed_tokens_per_s" not in records[e.name]]
    if untimed:
      settings.log(f"training-step time of {len(untimed)} configuration(s), each alone")
      for name, got in measure_train_speed(untimed, settings, shape).items():
        records[name].update(got)
      write_records(path, records)
  slow = [e for e in entries if e.name in records and "prefill_latency_s" not in records[e.name]]
  if settings.throughput and slow:
    settings.log(f"decode throughput and prefill latency of {len(slow)} configuration(s)")
    for measured in measure_throughput(slow, settings, shape):
      for name, got in measured.items():
        records[name].update(got)
      write_records(path, records)
  return records


def summary_line(rec: dict) -> str:
  parts = [f"held-out ppl {rec['eval_ppl']:.2f}" if "eval_ppl" in rec else "no held-out ppl"]
  if "eval_ppl_sequential" in rec:
    parts.append(f"exact {rec['eval_ppl_sequential']:.2f}")
  if "train_tokens_per_s" in rec:
    parts.append(f"train {rec['train_tokens_per_s']:,.0f} tok/s"
                 + (" (device shared)" if rec.get("train_shared_device") else ""))
  for p, g in DECODE_SETTINGS:
    d = rec.get(f"decode_{p}+{g}")
    if d:
      parts.append(f"{p}+{g}: {d['tokens_per_s']:,.0f} tok/s at batch {d['batch']}")
  return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The held-out multiple-choice task.
# ---------------------------------------------------------------------------------------------


def heldout_task(documents: Sequence[str], path: str, n: int = 200, choices: int = 4,
                 context_words: int = 24, answer_words: int = 8, seed: int = 0) -> str:
  """A multiple-choice task from held-out text: the context is a passage's first words, the
  right choice its next `answer_words` words, the others the same span of other passages.

  Written as a JSONL task file (`lckv_jax.eval.multiple_choice`); deterministic in `seed`.
  """
  import random
  spans = []
  for doc in documents:
    words = doc.split()
    for s in range(0, len(words) - context_words - answer_words, context_words + answer_words):
      spans.append((" ".join(words[s:s + context_words]),
                    " ".join(words[s + context_words:s + context_words + answer_words])))
  if len(spans) < choices:
    raise ValueError(f"held-out text too short for a {choices}-choice task: {len(spans)} passages")
  rng = random.Random(seed)
  picked = rng.sample(range(len(spans)), min(n, len(spans)))
  with open(path, "w", encoding="utf-8") as f:
    for i in picked:
      others = rng.sample([j for j in range(len(spans)) if j != i], choices - 1)
      options = [spans[i][1]] + [spans[j][1] for j in others]
      rng.shuffle(options)
      f.write(json.dumps({"context": spans[i][0], "choices": options,
                          "label": options.index(spans[i][1])}) + "\n")
  return path


# ---------------------------------------------------------------------------------------------
# Report: the table and the plots.
# ---------------------------------------------------------------------------------------------


def _fmt(x, spec: str = ",.0f") -> str:
  return "–" if x is None else format(x, spec)


def train_speed_key(rows: Sequence[dict]) -> str:
  """Which training tokens/s the costs compare: the timing pass's (each configuration alone on
  the device) once the baseline has one, else the median of the runs' logged steps."""
  timed = any(r["group"] == "baseline" and r.get("train_speed_tokens_per_s") for r in rows)
  return "train_speed_tokens_per_s" if timed else "train_tokens_per_s"


def baseline_tokens_per_s(rows: Sequence[dict]) -> float | None:
  """The standard model's training tokens/s, the mean over its seeds: what costs compare to."""
  key = train_speed_key(rows)
  base = [r[key] for r in rows if r["group"] == "baseline" and r.get(key)]
  return sum(base) / len(base) if base else None


def table(records: dict[str, dict]) -> str:
  """The study as a markdown table, one row per configuration, grouped as the grid is."""
  rows = list(records.values())
  key = train_speed_key(rows)
  base_tps = baseline_tokens_per_s(rows)
  task = sorted({t for r in rows for t in r.get("tasks", {})})
  head = ["configuration", "layer_types", "KV layers", "KV bytes/token", "held-out ppl",
          "exact ppl", *[f"{t} acc" for t in task],
          "train tok/s" + (" (alone)" if key == "train_speed_tokens_per_s" else " (logged)"),
          "train cost",
          *[f"decode {p}+{g} tok/s (batch)" for p, g in DECODE_SETTINGS], "prefill (s)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lt = r["layer_types"]
    short = lt if len(lt) <= 40 else lt[:37] + "..."
    # A run that shared the device logged a throughput that is no cost: only the timing pass's is.
    shared = key == "train_tokens_per_s" and r.get("train_shared_device")
    cost = (base_tps / r[key]) if base_tps and r.get(key) and not shared else None
    cells = [r["name"], f"`{short}`", str(r["kv_layers"]), _fmt(r.get("kv_bytes_per_token")),
             _fmt(r.get("eval_ppl"), ".2f"), _fmt(r.get("eval_ppl_sequential"), ".2f")]
    cells += [_fmt(r.get("tasks", {}).get(t, {}).get("acc"), ".3f") for t in task]
    cells += [_fmt(None if shared else r.get(key)), _fmt(cost, ".2f") + ("x" if cost else "")]
    for p, g in DECODE_SETTINGS:
      d = r.get(f"decode_{p}+{g}")
      cells.append(f"{d['tokens_per_s']:,.0f} ({d['batch']})" if d else "–")
    cells.append(_fmt(r.get("prefill_latency_s"), ".3f"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def noise(records: dict[str, dict]) -> dict | None:
  """The seed-to-seed spread of the baseline's held-out perplexity."""
  ppl = [r["eval_ppl"] for r in records.values() if r["group"] == "baseline" and "eval_ppl" in r]
  if len(ppl) < 2:
    return None
  return dict(n=len(ppl), min=min(ppl), max=max(ppl), spread=max(ppl) - min(ppl))


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats on both (higher x, lower y), by x."""
  keep = []
  for i, (x, y) in enumerate(points):
    if not any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for x2, y2 in points):
      keep.append(i)
  return sorted(keep, key=lambda i: points[i][0])


def label_offsets(points: Sequence[tuple[float, float]], widths: Sequence[float], height: float
                  ) -> list[float]:
  """Vertical offsets (in points, y up) of labels set to the right of `points` so that no two
  overlap. Labels whose spans overlap sideways form a column; a column keeps its points' order
  top to bottom, `height` apart at least, centred on its points. Points sharing a KV size (the
  study's columns) would otherwise print over one another."""
  n = len(points)
  spans = [(x, x + w) for (x, _), w in zip(points, widths)]
  column = list(range(n))  # union-find over sideways overlaps

  def root(i):
    while column[i] != i:
      i = column[i]
    return i
  for i in range(n):
    for j in range(i):
      if spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]:
        column[root(i)] = root(j)
  offsets = [0.0] * n
  for c in {root(i) for i in range(n)}:
    members = sorted((i for i in range(n) if root(i) == c), key=lambda i: -points[i][1])
    ys = [points[i][1] for i in members]
    pos = ys[:1]
    for y in ys[1:]:
      pos.append(min(y, pos[-1] - height))
    shift = sum(y - p for y, p in zip(ys, pos)) / len(ys)
    for i, p, y in zip(members, pos, ys):
      offsets[i] = p + shift - y
  return offsets


def label_points(ax, xs, ys, names, fontsize: float = 6) -> None:
  """Each point labelled with its name, no label over another (`label_offsets`); a label moved
  off its point gets a thin line to it."""
  fig = ax.figure
  fig.canvas.draw()  # the axes' limits, so that data map to points
  to_pt = 72 / fig.dpi
  pts = [tuple(v * to_pt for v in ax.transData.transform((x, y))) for x, y in zip(xs, ys)]
  widths = [0.55 * fontsize * len(n) for n in names]
  offsets = label_offsets(pts, widths, 1.2 * fontsize)
  for i, (x, y, n) in enumerate(zip(xs, ys, names)):
    dy = offsets[i]
    arrow = dict(arrowstyle="-", lw=0.4, color="0.5") if abs(dy) > 1 else None
    ax.annotate(n, (x, y), fontsize=fontsize, xytext=(4, dy - fontsize / 3),
                textcoords="offset points", arrowprops=arrow)


def plots(records: dict[str, dict], out_dir: str) -> list[str]:
  """Perplexity against KV-cache size (each configuration labelled), decode throughput against
  perplexity with the Pareto front, and training cost; returns the files written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in records.values() if "eval_ppl" in r]
  written = []
  if not rows:
    return written
  colors = {"baseline": "black", "warm-up": "tab:purple", "iterations": "tab:brown",
            "custom": "tab:gray"}
  palette = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
  for r in rows:
    if r["group"] not in colors:
      colors[r["group"]] = palette[len(colors) % len(palette)]

  def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    written.append(path)

  def scatter(ax, xs, ys, names, groups):
    for x, y, g in zip(xs, ys, groups):
      ax.scatter(x, y, color=colors[g], s=18)
    label_points(ax, xs, ys, names)
    for g in dict.fromkeys(groups):
      ax.scatter([], [], color=colors[g], label=g)
    ax.legend(fontsize=7)

  fig, ax = plt.subplots(figsize=(8, 5.5))
  scatter(ax, [r["kv_bytes_per_token"] / 1024 for r in rows], [r["eval_ppl"] for r in rows],
          [r["name"] for r in rows], [r["group"] for r in rows])
  ax.set_xlabel("KV cache per token (KiB)")
  ax.set_ylabel("held-out perplexity")
  ax.set_title("Quality against KV-cache size")
  path = os.path.join(out_dir, "study_ppl_vs_kv.png")
  save(fig, path)

  for p, g in DECODE_SETTINGS:
    key = f"decode_{p}+{g}"
    pts = [r for r in rows if r.get(key)]
    if not pts:
      continue
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs, ys = [r[key]["tokens_per_s"] for r in pts], [r["eval_ppl"] for r in pts]
    scatter(ax, xs, ys, [r["name"] for r in pts], [r["group"] for r in pts])
    front = pareto(list(zip(xs, ys)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="gray", lw=1,
            label="Pareto front")
    ax.legend(fontsize=7)
    ax.set_xlabel(f"decode tokens/s at the largest batch ({p}+{g})")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Throughput against quality")
    path = os.path.join(out_dir, f"study_throughput_{p}_{g}.png")
    save(fig, path)

  ref, key = baseline_tokens_per_s(rows), train_speed_key(rows)
  timed = [r for r in rows if r.get(key)
           and not (key == "train_tokens_per_s" and r.get("train_shared_device"))]
  if ref and timed:
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(timed))))
    ax.barh([r["name"] for r in timed], [ref / r[key] for r in timed],
            color=[colors[r["group"]] for r in timed])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("training time per token, relative to the standard transformer")
    ax.set_title("Training cost")
    path = os.path.join(out_dir, "study_train_cost.png")
    save(fig, path)
  return written


def report(records: dict[str, dict], out_dir: str) -> list[str]:
  """Writes study.md (the table, the noise) and the plots next to the records."""
  lines = ["# Study", "", table(records), ""]
  spread = noise(records)
  if spread:
    lines.append(f"Seed-to-seed noise of the standard model's held-out perplexity ({spread['n']} "
                 f"seeds): {spread['min']:.3f} to {spread['max']:.3f} (spread "
                 f"{spread['spread']:.3f}).")
  else:
    lines.append("Seed-to-seed noise: fewer than two baseline seeds measured.")
  path = os.path.join(out_dir, "study.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return [path] + plots(records, out_dir)


def finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)
