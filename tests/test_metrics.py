"""metrics.jsonl survives torn writes and never loses entries on resume."""
import json

import pytest

from tfusion import metrics


def write_lines(path, text):
  path.write_text(text)


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
  write_lines(tmp_path / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path))] == [1, 2]
  assert "dropping the torn last line 3" in caplog.text
  write_lines(tmp_path / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')   # no newline
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path))] == [1]


def test_damage_before_the_last_line_names_the_file_and_line(tmp_path):
  write_lines(tmp_path / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "lo{"step": 3}\n{"step": 4}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics entry"):
    metrics.read_metrics(str(tmp_path))


def test_resuming_keeps_entries_up_to_the_step_and_moves_the_rest_aside(tmp_path):
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
  write_lines(tmp_path / "metrics.jsonl", "".join(lines) + '{"step": 6, "lo')
  writer = metrics.MetricWriter(str(tmp_path), resume_step=3)
  writer.write(4, {"loss": 0.5})
  writer.close()
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4]
  assert (tmp_path / metrics.DROPPED).read_text() == "".join(lines[3:])
  metrics.MetricWriter(str(tmp_path), resume_step=0).close()     # no checkpoint left: everything moves aside
  assert metrics.read_metrics(str(tmp_path)) == []
  assert [m["step"] for m in metrics.read_metrics(str(tmp_path), metrics.DROPPED)] == [4, 5, 1, 2, 3, 4]
