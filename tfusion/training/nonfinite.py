"""The non-finite guard: a train state with a NaN or an infinity is never saved.

Generic over the state pytree: every floating leaf (params, optimizer state, anything a state grows)
is checked; integer leaves (step counters) cannot be non-finite.

  check_state   before each save: NonFiniteUpdate naming the step and the first non-finite leaf.
  SkipGuard     optional (config.nonfinite_skip_limit > 0): each step whose update or loss is not finite
                is dropped inside the jitted step (the state before it is kept, only the step counter
                advances; the batch is consumed) and counted; more than `limit` such steps in a row stop the
                run. It holds the state before the update until the update is known to be finite: about
                one extra train state of device memory.
"""
import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteUpdate(FloatingPointError):
  """The run produced a NaN or an infinity; the message names the step and what was not finite."""


def _floating(tree) -> list[tuple[str, jax.Array]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(path), x) for path, x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]


def _finite_leaves(tree) -> jax.Array:
  """bool [number of floating leaves]: each floating leaf of `tree` is finite everywhere (traceable)."""
  return jnp.stack([jnp.isfinite(x).all() for _, x in _floating(tree)])


_finite_leaves_jitted = jax.jit(_finite_leaves)


def all_finite(tree) -> jax.Array:
  """bool []: every element of every floating leaf of `tree` is finite (traceable)."""
  return _finite_leaves(tree).all()


def check_state(state, step: int, last_checkpoint: int | None) -> None:
  """Raise NonFiniteUpdate if a floating leaf of `state` (the state after `step`) is not finite."""
  finite = np.asarray(jax.device_get(_finite_leaves_jitted(state)))
  if finite.all():
    return
  names = [name for (name, _), ok in zip(_floating(state), finite) if not ok]
  raise NonFiniteUpdate(
      f"the train state after step {step} is not finite ({len(names)} leaves with NaN or inf, first: "
      f"state{names[0]}); stopped without saving it, last checkpoint: step {last_checkpoint}. Lower "
      "optim.lr or raise optim.warmup_steps, or resume with --config.nonfinite_skip_limit=N to skip such steps")


def save_if_finite(checkpointer, step: int, state, data_iterator) -> None:
  """Save `state` (after `step`) with the input position, after check_state: a non-finite state is never
  written, so the keep-N limit never deletes a good checkpoint for it."""
  check_state(state, step, checkpointer.latest_step())
  checkpointer.save(step, state, data_iterator)


class SkipGuard:
  """Wraps a jitted step(state, batch) -> (state, metrics with "loss") so non-finite updates are dropped.

  metrics gain "skipped" (bool []); after_step(step, metrics) counts them and raises NonFiniteUpdate past
  `limit` consecutive skips; take_count() returns the skips since its last call (for the logs)."""

  def __init__(self, limit: int):
    self.limit = limit
    self.in_a_row = 0
    self.since_log = 0

  def wrap(self, step_fn, state_shardings, batch_sharding, metrics_sharding):
    def guarded(state, batch):
      new, metrics = step_fn(state, batch)
      ok = all_finite(new) & jnp.isfinite(metrics["loss"])
      kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state).replace(step=new.step)
      return kept, dict(metrics, skipped=~ok)
    return jax.jit(guarded, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=0)

  def after_step(self, step: int, metrics: dict) -> bool:
    """Whether `step` was skipped (reads the flag from the device)."""
    skipped = bool(metrics["skipped"])
    self.in_a_row = self.in_a_row + 1 if skipped else 0
    self.since_log += skipped
    if self.in_a_row > self.limit:
      raise NonFiniteUpdate(
          f"steps {step - self.in_a_row + 1}..{step} all had a non-finite loss or update and were skipped, more "
          f"than config.nonfinite_skip_limit = {self.limit} in a row: stopped (the skipped updates were not "
          "applied, nothing non-finite was saved)")
    return skipped

  def take_count(self) -> int:
    count, self.since_log = self.since_log, 0
    return count
