"""Metric writers: metrics.jsonl (one JSON object per logged step) and TensorBoard event files."""
import json
import os

from absl import logging
import tensorboardX


class MetricWriter:
  """Writes scalars to <workdir>/metrics.jsonl and <workdir>/tensorboard.

  On resume from step S, logged entries after S (written before a crash, past the last
  checkpoint) are dropped so the files describe exactly one run history. In a multi-process run
  only one process writes (active=True); the others' writers do nothing.
  """

  def __init__(self, workdir: str, resume_step: int = 0, active: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if active:
      self._truncate_after(resume_step)
      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict) -> None:
    if self.tb is None:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    for name, value in scalars.items():
      self.tb.add_scalar(name, value, step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All entries of <workdir>/metrics.jsonl, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def quiet_library_info_logs() -> None:
  """Orbax logs every checkpoint step at INFO; keep its warnings, drop the chatter."""
  def keep(record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname
  logging.get_absl_handler().python_handler.addFilter(keep)
