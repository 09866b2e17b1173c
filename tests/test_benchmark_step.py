"""benchmarks/step.py: the config overrides and the interleaved A/B comparison."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import step as step_benchmark  # noqa: E402

TINY = os.path.join(step_benchmark.REPO, "experiments", "shapes_tiny.py")


def test_overrides_are_parsed_and_a_bad_field_is_named():
  base = step_benchmark.benchmark_config(TINY, seq_len=128, rows=2)
  before = base.to_dict()
  c = step_benchmark.with_overrides(base, ["model.attention=dense", "model.attention_chunk=32", "optim.lr=0.5"])
  assert (c.model.attention, c.model.attention_chunk, c.optim.lr) == ("dense", 32, 0.5)
  assert base.to_dict() == before                                            # the base is left alone
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
  for variants, steps in (([("a", []), ("a", [])], 1), ([("a=1", [])], 1), ([("a", [])], 0)):
    with pytest.raises(ValueError, match="distinct labels"):
      step_benchmark.compare(base, variants, steps)


def test_step_dots_counts_scans_the_cpu_branch_and_visible_block_pairs():
  import jax
  import jax.numpy as jnp
  import step_dots

  def layer(x, w):
    y = jax.lax.platform_dependent(x, cpu=lambda x: x @ w, default=lambda x: (x @ w) @ w)   # the CPU branch: 1
    blocks = y.reshape(2, 3, 4, 4)
    attention = jax.lax.cond(y.sum() > 0, lambda b: jnp.einsum("bhqd,bhkd->bhqk", b, b), jnp.zeros_like, blocks)
    return y + attention.sum(), None

  def f(x, w):
    return jax.lax.scan(layer, x, jnp.stack([w] * 5))[0] @ w                                 # 5 layers, then 1

  counts = step_dots.step_dots(jax.make_jaxpr(f)(jnp.ones((8, 12)), jnp.ones((12, 12))), visible_fraction=0.25)
  by_kind = {dot.attention: times for dot, times in counts.items() if dot.lhs == (2, 3, 4, 4)}
  assert by_kind == {True: 5 * 0.25}
  assert counts[step_dots.Dot((8, 12), (12, 12), ("float32", "float32"), (((1,), (0,)), ((), ())), False)] == 5 + 1
  assert sum(counts.values()) == 5 + 1 + 5 * 0.25
  assert step_dots.dot_flops(step_dots.Dot((2, 3, 4, 4), (2, 3, 4, 4), None, (((3,), (3,)), ((0, 1), (0, 1))), True)) \
      == 2 * 2 * 3 * 4 * 4 * 4
  other_cond = lambda x: jax.lax.cond(x.sum() > 0, lambda x: x @ x, jnp.zeros_like, x)  # noqa: E731
  with pytest.raises(ValueError, match="not an attention block"):
    step_dots.step_dots(jax.make_jaxpr(other_cond)(jnp.ones((4, 4))), visible_fraction=1.0)
  in_a_loop = lambda x: jax.lax.while_loop(lambda c: c[1].sum() < 9, lambda c: (c[0], c[0] @ c[1]), (x, x))  # noqa: E731
  with pytest.raises(ValueError, match="while loop"):
    step_dots.step_dots(jax.make_jaxpr(in_a_loop)(jnp.ones((4, 4))), visible_fraction=1.0)
