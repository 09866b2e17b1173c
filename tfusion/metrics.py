"""Metric writers: metrics.jsonl (one JSON object per logged step) and TensorBoard event files."""
import json
import math
import os

from absl import logging
import tensorboardX

from tfusion import run_dir


class MetricWriter:
  """Writes scalars to <workdir>/metrics.jsonl and <workdir>/tensorboard.

  On resume from step S, logged entries after S (written before a crash, past the last
  checkpoint) leave metrics.jsonl so it describes exactly one run history; they are appended to
  <workdir>/metrics_dropped.jsonl, never erased (also when no checkpoint is left at all), and only once
  (also when a kill came between that append and the truncation). A torn last line (a kill or a full
  disk during a write) is dropped with a warning. A value that is not finite (a skipped step's loss) is
  written as null, so that strict JSON readers read every line; TensorBoard gets the float. In a
  multi-process run only one process writes (active=True); the others' writers do nothing.
  """

  def __init__(self, workdir: str, resume_step: int = 0, active: bool = True):
    run = run_dir.RunDir(workdir)
    self.path, self.dropped_path = run.metrics_file, run.dropped_metrics_file
    self.tb = None
    if active:
      self._truncate_after(resume_step)
      self.tb = tensorboardX.SummaryWriter(run.tensorboard, purge_step=resume_step + 1)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    entries = _read_lines(self.path)
    kept = [line for line, entry in entries if entry["step"] <= step]
    dropped = [line for line, entry in entries if entry["step"] > step]
    if dropped:
      steps = [entry["step"] for _, entry in entries if entry["step"] > step]
      aside = self.dropped_path
      _append_once(aside, "".join(dropped).encode())
      logging.warning("%s: %d entries of steps %d..%d were logged after step %d, the step this run resumes "
                      "from%s; they were moved to %s", self.path, len(dropped), min(steps), max(steps), step,
                      "" if step else " (no checkpoint)", aside)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict) -> None:
    if self.tb is None:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    finite = {k: v if math.isfinite(v) else None for k, v in scalars.items()}    # strict JSON has no NaN
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
    for name, value in scalars.items():
      self.tb.add_scalar(name, value, step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _append_once(path: str, text: bytes) -> None:
  """Appends `text` to `path` unless the file already ends with it: an earlier append whose run was killed
  before metrics.jsonl was truncated."""
  with open(path, "a+b") as f:
    if f.tell() >= len(text):
      f.seek(-len(text), os.SEEK_END)
      if f.read() == text:
        return
    f.write(text)


def read_metrics(workdir: str, dropped: bool = False) -> list[dict]:
  """All entries of <workdir>/metrics.jsonl (or of metrics_dropped.jsonl), in order; a torn last line is
  dropped with a warning."""
  run = run_dir.RunDir(workdir)
  return [entry for _, entry in _read_lines(run.dropped_metrics_file if dropped else run.metrics_file)]


def _read_lines(path: str) -> list[tuple[str, dict]]:
  """(line, entry) of each line of a metrics file. The last line may be torn (cut short by a kill or a full
  disk): it is dropped with a warning. ValueError names the file and line of any other unreadable line."""
  with open(path) as f:
    lines = f.readlines()
  entries = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line) if line.endswith("\n") else None
    except ValueError:
      entry = None
    if entry is None or not isinstance(entry, dict) or "step" not in entry:
      if number == len(lines):
        logging.warning("%s: dropping the torn last line %d (%r): a write was cut short", path, number, line[:80])
        continue
      raise ValueError(f"{path}: line {number} is not a metrics entry ({line[:80]!r}); fix or remove it")
    entries.append((line, entry))
  return entries
