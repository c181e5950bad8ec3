"""Metric sinks: a JSONL log and TensorBoard event files (tensorboardX; no TensorFlow)."""

from __future__ import annotations

import json
import logging
import os
import time


class MetricWriter:
  """Writes `{'step', 'time', **metrics}` lines to `metrics.jsonl` and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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
