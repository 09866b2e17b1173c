"""metrics.jsonl survives torn writes and never loses entries on resume."""
import json

import pytest

from tfusion import metrics
from tests.helpers import raising


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path))] == [1, 2]
  assert "dropping the torn last line 3" in caplog.text
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')   # no newline
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path))] == [1]


def test_damage_before_the_last_line_names_the_file_and_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo{"step": 3}\n{"step": 4}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics entry"):
    metrics.read_metrics(str(tmp_path))


def test_resuming_keeps_entries_up_to_the_step_and_moves_the_rest_aside(tmp_path):
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 6, "lo')
  writer = metrics.MetricWriter(str(tmp_path), resume_step=3)
  writer.write(4, {"loss": 0.5})
  writer.close()
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4]
  assert (tmp_path / "metrics_dropped.jsonl").read_text() == "".join(lines[3:])
  metrics.MetricWriter(str(tmp_path), resume_step=0).close()     # no checkpoint left: everything moves aside
  assert metrics.read_metrics(str(tmp_path)) == []
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path), dropped=True)] == [4, 5, 1, 2, 3, 4]


def test_a_kill_between_moving_aside_and_truncating_moves_nothing_twice(tmp_path, monkeypatch):
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text("".join(lines))
  with monkeypatch.context() as patch:
    patch.setattr(metrics.os, "replace", raising(KeyboardInterrupt("killed before metrics.jsonl was replaced")))
    with pytest.raises(KeyboardInterrupt):
      metrics.MetricWriter(str(tmp_path), resume_step=3)
  assert (tmp_path / "metrics_dropped.jsonl").read_text() == "".join(lines[3:])      # moved aside, not yet truncated
  metrics.MetricWriter(str(tmp_path), resume_step=3).close()                   # the next start
  assert (tmp_path / "metrics_dropped.jsonl").read_text() == "".join(lines[3:])
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]


def test_non_finite_values_are_strict_json_nulls(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": float("nan"), "lr": float("inf"), "skipped_steps": 1})
  writer.close()

  def refuse(name):
    raise ValueError(f"{name} is not JSON")
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(line, parse_constant=refuse) == {"step": 1, "loss": None, "lr": None, "skipped_steps": 1.0}
