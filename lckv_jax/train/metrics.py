"""Metric sinks: a JSONL log and TensorBoard event files (tensorboardX; no TensorFlow)."""

from __future__ import annotations

import json
import logging
import os
import time


class MetricWriter:
  """Writes `{'step', 'time', **metrics}` lines to `metrics.jsonl` and scalars to TensorBoard.

  `resume_step`: the step the run resumes from. Rows of later steps (written before an
  interruption, then recomputed) are dropped, so the log holds each step once; TensorBoard is
  told the same (`purge_step`).
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               resume_step: int = 0):
    self.enabled = enabled
    self.tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, resume_step)
    self.jsonl = open(path, "a")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events (pip install "
                        "tensorboardX); metrics.jsonl is still written")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites the JSONL log without rows past `step` (atomically; a torn last line goes too)."""
  if not os.path.exists(path):
    return
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:  # a line cut short by a kill
        dropped += 1
        continue
      if row.get("step", 0) > step:
        dropped += 1
      else:
        keep.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
    logging.info("metrics.jsonl: dropped %d row(s) past the resumed step %d", dropped, step)
