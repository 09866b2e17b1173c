"""Orbax checkpoints of a train state together with the grain data iterator state, with checksums.

Where they live and which one a run resumes from is tfusion.run_dir's business."""
import collections
import glob
import json
import os
import time

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from tfusion import distributed, integrity


class Checkpointer:
  """<directory>/<step>/{state, data, checksums.json}: params, optimizer state, step, input position, and the
  checksums of those files (tfusion/integrity.py), each process hashing its own files before the commit.

  writer: this Checkpointer saves (it creates the directory and removes saves that never completed); False
  only reads. restore and restore_params verify the checksums of what they read before reading it."""

  def __init__(self, directory: str, max_to_keep: int, writer: bool = True):
    self.directory = directory
    self._saving = collections.deque()    # steps saved and not yet committed, oldest first
    self._barrier = ocp.multihost.get_barrier_sync_fn()
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=writer, enable_async_checkpointing=True,
            cleanup_tmp_directories=writer,
            async_options=ocp.AsyncOptions(barrier_sync_fn=self._hash_then_meet,
                                           post_finalization_callback=self._write_checksums)))

  def _hash_then_meet(self, key: str, timeout_ms: int) -> None:
    """orbax's barrier between the processes of a multi-process run. Before the one it calls once each
    process has written its files of a save, the process hashes those files (integrity.write_part).
    Should that fail, or orbax rename its barrier, process 0 hashes them at the commit instead."""
    if "async_write_complete" in key:
      step = self._saving[0] if distributed.is_chief() else self._saving.popleft()
      step_dir, start = self._tmp_dir(step), time.time()
      try:
        size = integrity.write_part(step_dir, jax.process_index())
        logging.info("checkpoint %d: this process hashed its %.1f MB in %.1f s", step, size / 1e6, time.time() - start)
      except OSError as e:
        logging.warning("checkpoint %d: this process could not hash its files (%s); process 0 hashes them", step, e)
    self._barrier(key=key, timeout_ms=timeout_ms)

  def _write_checksums(self) -> None:
    """Orbax calls this on process 0 once every process has written the oldest pending step, before it
    renames <step>.orbax-checkpoint-tmp into place: the checksums are committed with the files."""
    integrity.write_manifest(self._tmp_dir(self._saving.popleft()))

  def _tmp_dir(self, step: int) -> str:
    return os.path.join(self.directory, f"{step}{integrity.TMP_SUFFIX}")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    """Starts an asynchronous save; the state arrays are copied before this returns."""
    self._saving.append(step)           # before save(): its commit may come before save() returns
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=True,
          custom_metadata=dict(integrity.MARK))
    except BaseException:
      if self._saving and self._saving[-1] == step:
        self._saving.pop()              # never started: no commit will come for it
      raise

  def verify(self, step: int, item: str | None = None) -> None:
    """Checks the checksums of `step` (of its `item` only) on process 0 and shares the outcome:
    CorruptCheckpoint naming the file there, a RuntimeError pointing at its log on the other processes.
    A checkpoint saved before tfusion wrote checksums passes with a warning."""
    step_dir = self.step_dir(step)

    def check():
      if not integrity.verify(step_dir, item):
        logging.warning("checkpoint %s has no %s (saved before tfusion wrote checksums): restored unverified",
                        step_dir, integrity.MANIFEST)
    distributed.chief_only(f"verifying {step_dir}", check)

  def restore(self, step: int, abstract_state, data_iterator, verified: bool = False):
    """Restore into the shardings of `abstract_state` after verifying the step (unless `verified`: the
    caller just did, as open_run); sets `data_iterator` to the saved position. An iterator with
    `restore_from_processes` (pipeline.TrainBatches) reads every process's saved state, so the run may
    resume on another number of processes."""
    if not verified:
      self.verify(step)
    what = f"checkpoint {self.directory}/{step}"
    advice = " It was left untouched; move it away to resume from an earlier step."
    if not hasattr(data_iterator, "restore_from_processes"):
      return self._restore(step, what, advice, state=ocp.args.StandardRestore(abstract_state),
                           data=grain.checkpoint.CheckpointRestore(data_iterator)).state
    restored = self._restore(step, what, advice, state=ocp.args.StandardRestore(abstract_state))
    files = sorted(glob.glob(os.path.join(self.directory, str(step), "data", "process_*-of-*.json")))
    if not files:
      raise RuntimeError(f"{what} has no data position (data/process_*.json).{advice}")
    states = []
    for file in files:
      with open(file) as f:
        states.append(json.load(f))
    data_iterator.restore_from_processes(states)
    return restored.state

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore_params(self, step: int, abstract_params, item: str = "params"):
    """Only the params (item "params") or their EMA ("ema_params") of a saved train state (no optimizer
    state, no data position), into the shardings of `abstract_params`, after verifying the state's files
    (the params share them with the optimizer state; the data position is not read, not verified)."""
    self.verify(step, "state")
    target = {item: abstract_params}
    restored = self._restore(step, f"{item} of checkpoint {self.directory}/{step}", "",
                             state=ocp.args.PyTreeRestore(
                                 target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                 partial_restore=True))
    return restored.state[item]

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore(self, step: int, what: str, advice: str, **items):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for unreadable or mismatched files
      raise RuntimeError(f"{what} could not be restored ({type(e).__name__}: {e}).{advice}") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def saved_steps(directory: str) -> list[int]:
  """Steps of the committed checkpoints in `directory`, ascending (none if it does not exist)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def temporary_dirs(directory: str) -> list[str]:
  """Step directories orbax began and never committed (a save cut short by a kill or a crash)."""
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, n) for n in os.listdir(directory) if integrity.TMP_SUFFIX in n)


def set_aside_corrupt(directory: str) -> int | None:
  """Before a run resumes: reports the saves that were cut short (a writer Checkpointer removes them), then
  checks the checkpoints newest first against their checksums. Those that fail are renamed
  <step>.corrupt-<time> (orbax no longer sees them). Returns the newest step that verifies (None if there is
  no checkpoint); if none does, nothing is moved and CorruptCheckpoint lists them all."""
  for tmp in temporary_dirs(directory):
    logging.warning("removing %s: a checkpoint save that never completed (the run was stopped during it)", tmp)
  corrupt = []
  for step in reversed(saved_steps(directory)):
    step_dir = os.path.join(directory, str(step))
    try:
      if not integrity.verify(step_dir):
        logging.warning("checkpoint %s has no %s (saved before tfusion wrote checksums): not verified", step_dir,
                        integrity.MANIFEST)
    except integrity.CorruptCheckpoint as e:
      logging.error("%s", e)
      corrupt.append((step_dir, str(e)))
      continue
    for bad_dir, _ in corrupt:
      aside = f"{bad_dir}.corrupt-{int(time.time())}"
      os.rename(bad_dir, aside)
      logging.warning("moved the corrupt checkpoint %s to %s: resuming from step %d, the newest that verifies",
                      bad_dir, aside, step)
    return step
  if corrupt:
    raise integrity.CorruptCheckpoint(
        "no checkpoint verifies: " + "; ".join(e for _, e in corrupt) + f". Nothing was moved; move the damaged "
        f"ones away to resume from an older one, or the whole {directory} to start over.")
  return None
