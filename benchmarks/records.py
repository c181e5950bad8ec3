"""Record files: one per benchmark and device, each entry one run of one setting.

`benchmarks/results/<benchmark>_<device>.json` holds a JSON list of entries (`.jsonl`: one entry
a line, for `decode_profile`). `<device>` is `device_slug(jax.devices()[0].device_kind)`, e.g.
`h100_80gb_hbm3`, `h200`, `cpu`. An entry is the JSON object the benchmark measured, with a
`"setting"` key first: a name for what was measured (model, sizes, batch, flags). Each benchmark
builds its settings from its arguments; a run whose setting is already in the file replaces that
entry in place, so a re-run supersedes instead of adding a file (git keeps the old one).

A run on another machine (a device machine with `$OUT` set) writes a record file there holding
its new entries only; this command merges such files into benchmarks/results:

  python -m benchmarks.records $OUT/throughput_h100_80gb_hbm3.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile

from benchmarks.common import RESULTS


def device_slug(device_kind: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3', 'NVIDIA H200' -> 'h200', 'cpu' -> 'cpu'.

  The whole kind is kept (only the vendor dropped): an H100 PCIe and an H100 SXM differ in
  bandwidth by 1.7x, so they must not share a file.
  """
  kind = re.sub(r"^nvidia\s+", "", device_kind.strip().lower())
  slug = re.sub(r"[^a-z0-9]+", "_", kind).strip("_")
  if not slug:
    raise ValueError(f"device_kind {device_kind!r} has no letters or digits to name a file by")
  return slug


def record_path(out: str, benchmark: str, device_kind: str, ext: str = "json") -> str:
  """The record file of `benchmark` on `device_kind` in the folder `out`."""
  return os.path.join(out, f"{benchmark}_{device_slug(device_kind)}.{ext}")


def read(path: str) -> list[dict]:
  """The entries of a record file ([] if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    data = json.load(f)
  return data if isinstance(data, list) else [data]


def write(path: str, entries: list[dict]) -> None:
  """Writes `entries` to `path` whole, through a temporary file, so that a run killed mid-write
  leaves the previous file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      if path.endswith(".jsonl"):
        f.writelines(json.dumps(e) + "\n" for e in entries)
      else:
        json.dump(entries, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def merged(old: list[dict], new: list[dict]) -> list[dict]:
  """`old` with each entry of `new` in place of the entry of the same setting, or appended."""
  out = list(old)
  where = {e["setting"]: i for i, e in enumerate(out)}
  for e in new:
    if "setting" not in e:
      raise ValueError(f"a record entry has no 'setting' (keys: {sorted(e)[:8]} ...)")
    if e["setting"] in where:
      out[where[e["setting"]]] = e
    else:
      where[e["setting"]] = len(out)
      out.append(e)
  return out


def update(path: str, entries: list[dict]) -> None:
  """Adds `entries` to the record file, each replacing the entry of its setting."""
  write(path, merged(read(path), entries))


def entry(setting: str, **fields) -> dict:
  """A record entry: the run's fields with its setting first."""
  return {"setting": setting, **{k: v for k, v in fields.items() if k != "setting"}}


def find(entries: list[dict], setting: str) -> dict:
  """The entry of `setting`; a KeyError naming the settings there are otherwise."""
  for e in entries:
    if e.get("setting") == setting:
      return e
  raise KeyError(f"no entry with setting {setting!r}; there are: "
                 f"{', '.join(repr(e.get('setting')) for e in entries)}")


def load(paths: list[str], required: tuple[str, ...] = ()) -> list[dict]:
  """The entries of several files (record files, or JSON files of one record or a list of them),
  each checked for the `required` keys."""
  out = []
  for p in paths:
    for r in read(p):
      missing = [k for k in required if k not in r]
      if missing:
        raise ValueError(f"{p}: a record lacks {missing}")
      out.append(r)
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Merges record files (e.g. a device machine's $OUT) "
                              "into the record files of the same name in benchmarks/results.")
  p.add_argument("files", nargs="+", help="record files named <benchmark>_<device>.json(l)")
  p.add_argument("--into", default=RESULTS, help="folder of the record files to update")
  args = p.parse_args(argv)
  for path in args.files:
    entries = read(path)
    slug = os.path.basename(path).rsplit(".", 1)[0]
    for e in entries:
      if "setting" not in e:
        raise SystemExit(f"{path}: an entry has no 'setting'; is it a record file?")
      if "device" in e and not slug.endswith("_" + device_slug(e["device"])):
        raise SystemExit(f"{path}: entry {e['setting']!r} ran on {e['device']!r}, which is not "
                         f"the device this file is named for")
    target = os.path.join(args.into, os.path.basename(path))
    before = {e["setting"] for e in read(target)}
    update(target, entries)
    replaced = sum(e["setting"] in before for e in entries)
    print(f"{target}: {len(entries) - replaced} added, {replaced} replaced")


if __name__ == "__main__":
  main()
