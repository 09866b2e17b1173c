"""benchmarks/step.py: the config overrides and the interleaved A/B comparison."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import step as step_benchmark  # noqa: E402

TINY = os.path.join(step_benchmark.REPO, "experiments", "shapes_tiny.py")


def test_overrides_are_parsed_and_a_bad_field_is_named():
  base = step_benchmark.benchmark_config(TINY, seq_len=128, rows=2)
  c = step_benchmark.with_overrides(base, ["model.attention=dense", "model.attention_chunk=32", "optim.lr=0.5"])
  assert (c.model.attention, c.model.attention_chunk, c.optim.lr) == ("dense", 32, 0.5)
  assert base.model.attention != "dense" or base.model.attention_chunk != 32      # the base is left alone
  with pytest.raises(ValueError, match="model.no_such_field"):
    step_benchmark.with_overrides(base, ["model.no_such_field=1"])


def test_compare_alternates_variants_and_divides_each_step_by_its_own_peak(monkeypatch):
  base = step_benchmark.benchmark_config(TINY, seq_len=128, rows=2)
  peaks = iter([0.5, 0.25, 0.125, 1.0])                    # one per timed step, in the order they are taken
  monkeypatch.setattr(step_benchmark, "matmul_peak", lambda dtype, repeats: next(peaks))
  order, timed_step = [], step_benchmark.timed_step

  def recording_step(run, state, batch, mesh):
    order.append(run)
    return timed_step(run, state, batch, mesh)

  monkeypatch.setattr(step_benchmark, "timed_step", recording_step)
  results = step_benchmark.compare(base, [("chunked", ["model.attention=chunked", "model.attention_chunk=32"]),
                                          ("dense", ["model.attention=dense"])], steps=2)
  assert list(results) == ["chunked", "dense"]
  chunked, dense = results["chunked"], results["dense"]
  # One compiling step per variant, then rounds of one step each: A, B, A, B.
  assert order[2:] == [order[0], order[1], order[0], order[1]] and order[0] is not order[1]
  assert chunked["matmul_peak_tflops_all"] == [0.5, 0.125] and dense["matmul_peak_tflops_all"] == [0.25, 1.0]
  for r in (chunked, dense):
    assert len(r["step_seconds_all"]) == 2 and r["dtype"] == base.model.dtype
    ratios = [r["model_tflops_per_step"] / s / p for s, p in zip(r["step_seconds_all"], r["matmul_peak_tflops_all"])]
    assert r["mfu"] == pytest.approx(sum(ratios) / 2)       # the median of two
  # Chunked and dense attention compute the same step: same FLOPs counted, same first loss.
  assert chunked["model_tflops_per_step"] == dense["model_tflops_per_step"] > 0
  assert chunked["first_loss"] == pytest.approx(dense["first_loss"], rel=1e-5)
