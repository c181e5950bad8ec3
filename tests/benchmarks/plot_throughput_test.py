"""benchmarks/plot_throughput.py: the throughput plot and its command line."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests import ROOT


def _plot_module():
  path = os.path.join(ROOT, "benchmarks", "plot_throughput.py")
  spec = importlib.util.spec_from_file_location("plot_throughput", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _records(labels, batches, seed=0):
  rng = np.random.default_rng(seed)
  return [dict(label=label, prompt=512, gen=256, batch=batch,
               tokens_per_s=float(rng.uniform(1e3, 2e4)),
               decode_tokens_per_s=float(rng.uniform(1e3, 3e4)), max_batch=batch == batches[-1])
          for label in labels for batch in batches]


def test_plot_writes_a_png(tmp_path):
  pytest.importorskip("matplotlib")
  out = tmp_path / "throughput.png"
  _plot_module().plot(_records(["1b llama", "1b lckv"], [8, 32]), str(out), title="decode")
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_cli_reads_single_records_and_lists(tmp_path):
  pytest.importorskip("matplotlib")
  records = _records(["1b llama", "7b lckv"], [1, 4, 16], seed=3)
  (tmp_path / "throughput_a.json").write_text(json.dumps(records[0]))
  (tmp_path / "throughput_b.json").write_text(json.dumps(records[1:]))
  out = tmp_path / "sizes.png"
  _plot_module().main([str(tmp_path / "throughput_a.json"), str(tmp_path / "throughput_b.json"),
                       "--out", str(out)])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
