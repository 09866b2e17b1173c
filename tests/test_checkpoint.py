"""Checkpoints round-trip the train state bit for bit and the input position exactly, and carry checksums."""
import json
import os

import jax
import numpy as np
import pytest

from tfusion import config as config_lib, sharding
from tfusion.training import checkpoint, integrity
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


def saved_checkpoints(tmp_path, steps):
  """A Checkpointer directory with the tiny model's state saved at `steps`, and the abstract state."""
  config = tiny_config()
  mesh = sharding.make_mesh(config_lib.default_config().mesh, jax.devices()[:1])
  _, state, _ = init_state(config, mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), 5)
  for step in steps:
    ckpt.save(step, state, iter(make_stream()))
  ckpt.wait()
  return ckpt, state


def largest_file(step_dir):
  return max((os.path.join(root, n) for root, _, names in os.walk(step_dir) for n in names), key=os.path.getsize)


def test_every_checkpoint_carries_checksums_that_catch_flips_truncation_and_loss(tmp_path):
  ckpt, state = saved_checkpoints(tmp_path, [1])
  step_dir = ckpt.step_dir(1)
  assert integrity.verify(step_dir)
  names = json.load(open(os.path.join(step_dir, integrity.MANIFEST)))
  assert any(n.startswith("state/") for n in names) and "data/process_0-of-1.json" in names
  target = largest_file(os.path.join(step_dir, "state"))
  name = os.path.relpath(target, step_dir)
  original = open(target, "rb").read()

  with open(target, "r+b") as f:
    f.seek(len(original) // 2)
    f.write(bytes(b ^ 0xFF for b in original[len(original) // 2:len(original) // 2 + 8]))
  with pytest.raises(integrity.CorruptCheckpoint, match=rf"ckpt/1: file {name} differs from its checksum"):
    integrity.verify(step_dir)
  abstract = checkpoint.abstract_like(state.params, jax.tree.map(lambda x: x.sharding, state.params))
  with pytest.raises(integrity.CorruptCheckpoint, match=name):
    ckpt.restore_params(1, abstract)                      # what generate and export load through

  with open(target, "wb") as f:
    f.write(original[:-10])
  with pytest.raises(integrity.CorruptCheckpoint, match=rf"file {name} has {len(original) - 10} bytes, "
                                                        rf"{len(original)} were written"):
    integrity.verify(step_dir)
  os.remove(target)
  with pytest.raises(integrity.CorruptCheckpoint, match=rf"file {name} is missing"):
    integrity.verify(step_dir)
  ckpt.close()


def test_corrupt_checkpoints_are_set_aside_unless_none_verifies(tmp_path):
  ckpt, _ = saved_checkpoints(tmp_path, [1, 2, 3])
  ckpt.close()
  directory = str(tmp_path / "ckpt")
  for step in (2, 3):
    with open(largest_file(os.path.join(directory, str(step), "state")), "r+b") as f:
      f.write(b"\0" * 8)
  checkpoint.set_aside_corrupt(directory)
  assert checkpoint.saved_steps(directory) == [1]
  assert sorted(n.split("-")[0] for n in os.listdir(directory) if ".corrupt-" in n) == ["2.corrupt", "3.corrupt"]

  with open(largest_file(os.path.join(directory, "1", "state")), "r+b") as f:
    f.write(b"\0" * 8)
  with pytest.raises(integrity.CorruptCheckpoint, match=r"no checkpoint verifies: checkpoint .*ckpt/1: file"):
    checkpoint.set_aside_corrupt(directory)
  assert checkpoint.saved_steps(directory) == [1]                  # nothing moved: a person decides
