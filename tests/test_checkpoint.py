"""Checkpoints round-trip the train state bit for bit and the input position exactly."""
import os

import jax
import numpy as np
import pytest

from tfusion import config as config_lib, sharding
from tfusion.training import checkpoint
from tests.test_model import init_state, tiny_batch, tiny_config, run_steps
from tests.test_sequence import make_stream


def test_save_restore_gives_identical_params_and_next_batch(tmp_path):
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)                      # 8 fake devices
  _, state, step = init_state(config, mesh)
  state, _ = run_steps(mesh, state, step, {k: np.concatenate([v] * 4) for k, v in tiny_batch().items()}, 2)
  data = iter(make_stream())
  for _ in range(5):
    next(data)

  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  ckpt.save(2, state, data)
  ckpt.wait()
  expected_batch = next(data)

  _, fresh, _ = init_state(config, mesh)                        # same shapes, other values after training
  fresh_data = iter(make_stream())
  shardings = jax.tree.map(lambda x: x.sharding, fresh)
  restored = checkpoint.Checkpointer(str(tmp_path / "ckpt"), 2).restore(
      2, checkpoint.abstract_like(fresh, shardings), fresh_data)

  assert int(restored.step) == 2
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)))
  got = next(fresh_data)
  for k in expected_batch:
    np.testing.assert_array_equal(got[k], expected_batch[k])
  ckpt.close()


def test_corrupt_checkpoint_error_names_the_checkpoint_and_keeps_it(tmp_path):
  config = tiny_config()
  mesh = sharding.make_mesh(config_lib.default_config().mesh, jax.devices()[:1])
  _, state, _ = init_state(config, mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), 2)
  ckpt.save(1, state, iter(make_stream()))
  ckpt.wait()
  state_dir = tmp_path / "ckpt" / "1" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name != "commit_success.txt":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  shardings = jax.tree.map(lambda x: x.sharding, state)
  with pytest.raises(RuntimeError, match=r"checkpoint .*ckpt/1 could not be restored.*left untouched"):
    checkpoint.Checkpointer(str(tmp_path / "ckpt"), 2).restore(
        1, checkpoint.abstract_like(state, shardings), iter(make_stream()))
  assert (tmp_path / "ckpt" / "1").exists()
