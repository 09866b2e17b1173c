"""Checkpoints round-trip the train state bit for bit and the input position exactly, and carry checksums."""
import json
import os

import jax
import numpy as np
import pytest

from tfusion import checkpoints, config as config_lib, integrity, run_dir, sharding
from tests.helpers import init_state, make_stream, raising, run_steps, tiny_batch, tiny_model_config


def test_save_restore_gives_identical_params_and_next_batch(tmp_path):
  config = tiny_model_config()
  mesh = sharding.make_mesh(config.mesh)                      # 8 fake devices
  _, state, step = init_state(config, mesh)
  state, _ = run_steps(mesh, state, step, {k: np.concatenate([v] * 4) for k, v in tiny_batch().items()}, 2)
  data = iter(make_stream())
  for _ in range(5):
    next(data)

  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  ckpt.save(2, state, data)
  ckpt.wait()
  expected_batch = next(data)

  _, fresh, _ = init_state(config, mesh)                        # same shapes, other values after training
  fresh_data = iter(make_stream())
  shardings = jax.tree.map(lambda x: x.sharding, fresh)
  restored = checkpoints.Checkpointer(str(tmp_path / "ckpt"), 2).restore(
      2, sharding.abstract_like(fresh, shardings), fresh_data)

  assert int(restored.step) == 2
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)))
  got = next(fresh_data)
  for k in expected_batch:
    np.testing.assert_array_equal(got[k], expected_batch[k])
  ckpt.close()


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_kept(tmp_path, caplog):
  ckpt, state = saved_checkpoints(tmp_path, [1])
  ckpt.close()
  step_dir = tmp_path / "ckpt" / "1"
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      if name != "commit_success.txt":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  shardings = jax.tree.map(lambda x: x.sharding, state)
  abstract = sharding.abstract_like(state, shardings)
  with pytest.raises(integrity.CorruptCheckpoint, match=r"ckpt/1: file state/\S+ has 7 bytes"):
    checkpoints.Checkpointer(str(tmp_path / "ckpt"), 2).restore(1, abstract, iter(make_stream()))
  # Saved before tfusion wrote checksums (none, no mark in the step metadata): restored unverified, and
  # what orbax cannot read stops the restore naming the checkpoint.
  os.remove(step_dir / integrity.MANIFEST)
  metadata = json.load(open(step_dir / integrity.STEP_METADATA))
  json.dump(dict(metadata, custom_metadata={}), open(step_dir / integrity.STEP_METADATA, "w"))
  with pytest.raises(RuntimeError, match=r"checkpoint .*ckpt/1 could not be restored.*left untouched"):
    checkpoints.Checkpointer(str(tmp_path / "ckpt"), 2).restore(1, abstract, iter(make_stream()))
  assert "saved before tfusion wrote checksums): restored unverified" in caplog.text
  assert step_dir.exists()


def saved_checkpoints(tmp_path, steps, directory="ckpt"):
  """A Checkpointer of tmp_path/directory with the tiny model's state saved at `steps` (its step counter set
  to the step), and the state."""
  config = tiny_model_config()
  mesh = sharding.make_mesh(config_lib.default_config().mesh, jax.devices()[:1])
  _, state, _ = init_state(config, mesh)
  ckpt = checkpoints.Checkpointer(str(tmp_path / directory), 5)
  for step in steps:
    ckpt.save(step, state.replace(step=jax.device_put(step, state.step.sharding)), iter(make_stream()))
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
  abstract = sharding.abstract_like(state.params, jax.tree.map(lambda x: x.sharding, state.params))
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
  assert checkpoints.set_aside_corrupt(directory) == 1
  assert checkpoints.saved_steps(directory) == [1]
  assert sorted(n.split("-")[0] for n in os.listdir(directory) if ".corrupt-" in n) == ["2.corrupt", "3.corrupt"]

  with open(largest_file(os.path.join(directory, "1", "state")), "r+b") as f:
    f.write(b"\0" * 8)
  with pytest.raises(integrity.CorruptCheckpoint, match=r"no checkpoint verifies: checkpoint .*ckpt/1: file"):
    checkpoints.set_aside_corrupt(directory)
  assert checkpoints.saved_steps(directory) == [1]                  # nothing moved: a person decides


def test_malformed_checksums_unreadable_files_and_lost_checksums_are_corruption(tmp_path, monkeypatch):
  ckpt, _ = saved_checkpoints(tmp_path, [1, 2, 3])
  ckpt.close()
  directory = tmp_path / "ckpt"
  manifest = directory / "3" / integrity.MANIFEST
  original = manifest.read_text()
  for wrong in ("[]", '{"state/x": 3}', '{"state/x": {"bytes": 1}}'):
    manifest.write_text(wrong)
    with pytest.raises(integrity.CorruptCheckpoint, match=r"ckpt/3: unreadable checksums.json"):
      integrity.verify(str(directory / "3"))
  manifest.write_text(original)
  with monkeypatch.context() as patch:
    patch.setattr(integrity, "sha256_of", raising(OSError(5, "Input/output error")))
    with pytest.raises(integrity.CorruptCheckpoint, match=r"ckpt/3: file \S+ cannot be read .*Input/output error"):
      integrity.verify(str(directory / "3"))
  # A lost checksums.json: the step metadata says there was one; or, without that mark, an older checkpoint has one.
  manifest.unlink()
  with pytest.raises(integrity.CorruptCheckpoint, match=r"ckpt/3: checksums.json is missing, although its "
                                                        r"_CHECKPOINT_METADATA says it was saved with one"):
    integrity.verify(str(directory / "3"))
  for step in (1, 3):
    path = directory / str(step) / integrity.STEP_METADATA
    path.write_text(json.dumps(dict(json.loads(path.read_text()), custom_metadata={})))
  with pytest.raises(integrity.CorruptCheckpoint, match=r"although the older checkpoint .*ckpt/2 has one"):
    integrity.verify(str(directory / "3"))
  (directory / "1" / integrity.MANIFEST).unlink()
  assert integrity.verify(str(directory / "1")) is False           # saved before tfusion wrote checksums
  # Orbax's step metadata is not hashed (it changes at the commit), but must be JSON.
  (directory / "2" / integrity.STEP_METADATA).write_text('{"item_handlers": ')
  with pytest.raises(integrity.CorruptCheckpoint, match=r"ckpt/2: unreadable _CHECKPOINT_METADATA"):
    integrity.verify(str(directory / "2"))
  # All three as the fallback finds them: 3 and 2 are set aside, 1 is resumed from.
  assert checkpoints.set_aside_corrupt(str(directory)) == 1
  assert checkpoints.saved_steps(str(directory)) == [1]


def test_each_process_hashes_its_own_files_and_process_0_the_rest(tmp_path):
  """Process 1 of 11 hashes its files while orbax still has them in <item>.orbax-checkpoint-tmp; process 0,
  after orbax renamed the items, merges that with the hashes of the files no part lists."""
  files = {"state/ocdbt.process_0/d/a": b"0", "state/ocdbt.process_1/d/b": b"1", "state/ocdbt.process_10/d/c": b"10",
           "state/array_metadatas/process_1": b"1m", "data/process_1-of-11.json": b"{}",
           "data/process_0-of-11.json": b"{}", "state/_METADATA": b"m", integrity.STEP_METADATA: b"{}"}
  for name, content in files.items():
    item, _, rest = name.partition("/")
    path = tmp_path / (item + integrity.TMP_SUFFIX) / rest if rest else tmp_path / name
    os.makedirs(path.parent, exist_ok=True)
    path.write_bytes(content)
  assert integrity.write_part(str(tmp_path), 1) == 5
  assert sorted(json.load(open(tmp_path / "checksums-process_1.json"))) == [
      "data/process_1-of-11.json", "state/array_metadatas/process_1", "state/ocdbt.process_1/d/b"]
  for item in ("state", "data"):
    os.rename(tmp_path / (item + integrity.TMP_SUFFIX), tmp_path / item)
  (tmp_path / "state/manifest.ocdbt").write_bytes(b"written at the commit")
  (tmp_path / "state/ocdbt.process_1/d/b").write_bytes(b"2")    # process 0 takes process 1's hash, not its own
  integrity.write_manifest(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [integrity.STEP_METADATA, integrity.MANIFEST, "data", "state"]
  assert sorted(json.load(open(tmp_path / integrity.MANIFEST))) == sorted(
      set(files) - {integrity.STEP_METADATA} | {"state/manifest.ocdbt"})
  with pytest.raises(integrity.CorruptCheckpoint, match=r"file state/ocdbt.process_1/d/b differs"):
    integrity.verify(str(tmp_path))


def test_a_save_that_fails_to_start_is_forgotten_and_restore_params_verifies_only_the_state(tmp_path, monkeypatch):
  ckpt, state = saved_checkpoints(tmp_path, [1])
  with monkeypatch.context() as patch:
    patch.setattr(ckpt.manager, "save", raising(OSError(28, "No space left")))
    with pytest.raises(OSError):
      ckpt.save(2, state, iter(make_stream()))
  ckpt.save(3, state, iter(make_stream()))                # its checksums go to its own directory
  ckpt.wait()
  ckpt.close()
  assert checkpoints.saved_steps(ckpt.directory) == [1, 3] and integrity.verify(ckpt.step_dir(3))

  with open(ckpt.step_dir(3) + "/data/process_0-of-1.json", "a") as f:
    f.write(" ")
  reader = checkpoints.Checkpointer(ckpt.directory, 1, writer=False)
  abstract = sharding.abstract_like(state.params, jax.tree.map(lambda x: x.sharding, state.params))
  reader.restore_params(3, abstract)                      # the data position is not read, not checked
  with pytest.raises(integrity.CorruptCheckpoint, match=r"file data/process_0-of-1.json has"):
    reader.restore(3, sharding.abstract_like(state, jax.tree.map(lambda x: x.sharding, state)), iter(make_stream()))
  reader.close()


def test_every_process_restores_the_step_process_0_chose(tmp_path, monkeypatch):
  """On a shared filesystem another process may still list a checkpoint process 0 set aside: RunDir.open_checkpoints
  restores the step process 0 broadcast, not the newest one the process sees."""
  ckpt, state = saved_checkpoints(tmp_path, [1, 2], directory="checkpoints")
  ckpt.close()
  monkeypatch.setattr(run_dir.distributed, "chief_decides", lambda name, fn: 1)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  ckpt, restored, step = run_dir.RunDir(str(tmp_path)).open_checkpoints(5, state, shardings, iter(make_stream()))
  assert step == 1 and int(restored.step) == 1
  ckpt.close()
