"""The metrics picture: what it reads from metrics.jsonl, what it draws, and its errors."""

import json

import numpy as np
import pytest

from lckv_jax import metrics_plot

pytest.importorskip("matplotlib", reason="plotting needs matplotlib (requirements.txt)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(path, seed, torn=False):
  rng = np.random.default_rng(seed)
  path.mkdir()
  rows = []
  for step in range(10, 110, 10):
    row = {"step": step, "loss": float(rng.uniform(1, 4)), "lr": float(rng.uniform(0, 1e-3)),
           "grad_norm": float(rng.uniform(0.1, 3)), "tokens_per_s": float(rng.uniform(1e3, 5e3))}
    if step % 50 == 0:
      row.update(eval_loss=float(rng.uniform(1, 4)), eval_ppl=float(rng.uniform(3, 50)))
    rows.append(row)
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (path / "metrics.jsonl").write_text(text + ('{"step": 110, "lo' if torn else ""))
  return rows


def test_each_panel_draws_its_metric_and_a_torn_last_line_is_skipped(tmp_path):
  rows = _run(tmp_path / "run", 0, torn=True)
  read = metrics_plot.read_metrics(str(tmp_path / "run"))
  assert read == rows
  fig = metrics_plot.figure({"run": read})
  loss_ax, lr_ax, grad_ax, tps_ax = fig.axes
  train, held_out = loss_ax.get_lines()
  np.testing.assert_array_equal(train.get_xdata(), [r["step"] for r in rows])
  np.testing.assert_array_equal(train.get_ydata(), [r["loss"] for r in rows])
  np.testing.assert_array_equal(held_out.get_xdata(), [50, 100])
  np.testing.assert_array_equal(held_out.get_ydata(), [rows[4]["eval_loss"], rows[9]["eval_loss"]])
  np.testing.assert_array_equal(lr_ax.get_lines()[0].get_ydata(), [r["lr"] for r in rows])
  assert grad_ax.get_yscale() == "log"
  np.testing.assert_array_equal(tps_ax.get_lines()[0].get_ydata(),
                                [r["tokens_per_s"] for r in rows])


def test_cli_writes_the_png_into_the_workdir_and_compares_two_runs(tmp_path, capsys):
  _run(tmp_path / "a", 1)
  _run(tmp_path / "b", 2)
  metrics_plot.main([str(tmp_path / "a")])
  png = tmp_path / "a" / "metrics.png"
  assert capsys.readouterr().out.strip() == f"wrote {png}"
  assert png.read_bytes()[:8] == PNG_MAGIC
  out = tmp_path / "ab.png"
  metrics_plot.main([str(tmp_path / "a"), str(tmp_path / "b"), f"--out={out}"])
  assert out.read_bytes()[:8] == PNG_MAGIC
  fig = metrics_plot.figure({"a": metrics_plot.read_metrics(str(tmp_path / "a")),
                             "b": metrics_plot.read_metrics(str(tmp_path / "b"))})
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
      "a train", "a held-out", "b train", "b held-out"]


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl in .*train.py --workdir"):
    metrics_plot.read_metrics(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match="line 2: not JSON"):
    metrics_plot.read_metrics(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="no rows yet"):
    metrics_plot.read_metrics(str(tmp_path))
