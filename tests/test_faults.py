"""Fault injection on real training processes: each promise of docs/reliability.md, performed.

Signals, kill -9 during a save, a second launch, flipped checkpoint bytes, an unfinished save, a torn
metrics line, changed configs, a NaN-producing override and a full disk, on `python -m tfusion.train`
subprocesses of a tiny config
(with a shared compilation cache), checked against one uninterrupted run: bit-exact params, the same
logged values, exit codes, and messages that name the step, file or field.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import (checkpoints, config as config_lib, config_resume, integrity, prepare as prepare_lib, run_dir,
                     train_vae, workdir_lock)
from tfusion.metrics import read_metrics
from tfusion.training import nonfinite, preemption, step as step_lib, trainer
from tests.helpers import assert_same_state, raising, saved_state, set_fields, without_timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 24          # steps of the reference run; every interrupted run stops well before
def fields(data_dir, **changes):  # noqa: F811
  """The tiny run: shapes_tiny.py:16 with these fields; constant lr after warmup, so stopping a run and
  resuming it with another total_steps follows the same schedule."""
  f = {"total_steps": TOTAL, "batch_size": 8, "seq_len": 64, "log_every": 1, "ckpt_every": 4,
       "sample_every": 1000, "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2, "model.mlp_dim": 64,
       "model.patch_size": 4, "data.vocab_size": 512, "data.data_dir": data_dir, "optim.warmup_steps": 2,
       "optim.final_lr_fraction": 1.0, "sample.num_images": 2, "sample.num_captions": 2,
       "sample.diffusion_steps": 4, "sample.max_caption_tokens": 4, "peak_tflops_per_device": 1.0, "ema_decay": 0.999}
  f.update({k.replace("__", "."): v for k, v in changes.items()})
  return f


def config_of(values: dict):
  return set_fields(config_lib.load_experiment(os.path.join(REPO, "experiments", "shapes_tiny.py:16")), values)


def launch(workdir, values: dict, log: str, *extra, prefix=()) -> subprocess.Popen:
  """`python -m tfusion.train` (after the command `prefix`) in a process group of its own, which its grain
  workers join: os.killpg signals them all, as a Ctrl-C in a terminal or a scheduler does."""
  # Every compilation cached, also the many small ones of a checkpoint save: 15 s less per process.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  cmd = [*prefix, sys.executable, "-m", "tfusion.train", "--config", "experiments/shapes_tiny.py:16", "--workdir",
         str(workdir), *[f"--config.{k}={v}" for k, v in values.items()], *extra]
  with open(log, "w") as out:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def grain_workers(process) -> list[int]:
  """pids of the worker processes a run started through multiprocessing's spawn (its grain workers)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
      command = open(f"/proc/{pid}/cmdline").read()
    except OSError:
      continue                          # gone meanwhile
    if parent == process.pid and "spawn_main" in command:
      found.append(int(pid))
  return found


def wait_until_idle(workdir, process, log, seconds=2.0) -> None:
  """Until the run has logged no step for `seconds`."""
  last = [logged_steps(workdir), time.time()]

  def idle():
    if logged_steps(workdir) != last[0]:
      last[:] = [logged_steps(workdir), time.time()]
    return time.time() - last[1] > seconds
  wait_until(idle, process, log)


def pause(process) -> None:
  """SIGSTOP, and wait until every thread of the process has stopped: nothing of it moves until SIGCONT."""
  process.send_signal(signal.SIGSTOP)
  tasks = f"/proc/{process.pid}/task"
  while any(open(f"{tasks}/{t}/stat").read().rsplit(")", 1)[1].split()[0] not in "tT" for t in os.listdir(tasks)):
    time.sleep(0.001)


def finish(process, log, timeout=300) -> tuple[int, str]:
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  with open(log) as f:
    return process.returncode, f.read()


def logged_steps(workdir) -> list[int]:
  """Steps of the complete lines of metrics.jsonl (the file may be in the middle of a write)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def says(log, text) -> bool:
  """Whether the log file holds `text` yet."""
  with open(log) as f:
    return text in f.read()


def wait_until(predicate, process, log, timeout=240, poll=0.02):
  deadline = time.time() + timeout
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f"exited early with {process.returncode}:\n{open(log).read()[-3000:]}")
    assert time.time() < deadline, open(log).read()[-3000:]
    time.sleep(poll)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):  # noqa: F811
  """An uninterrupted in-process run of TOTAL steps: (workdir, its metrics, its final state)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  trainer.train_and_evaluate(config_of(fields(data_dir)), workdir)
  return workdir, read_metrics(workdir), saved_state(workdir, TOTAL)


# ----------------------------------------------------------------------------------------------
# Signals, a second launch, kill -9 during a save: one workdir through five processes, then bit-exact.
# The signals come while the run waits (for its paused data workers) or soon after a step, and the kill
# while the run is paused (SIGSTOP), so every run stops at an early step however busy this machine is.
# ----------------------------------------------------------------------------------------------
def test_signals_second_launch_and_kill_resume_bit_exactly(tmp_path, data_dir, reference):  # noqa: F811
  workdir, logs = str(tmp_path / "run"), str(tmp_path)
  long_run = fields(data_dir, total_steps=1000, ckpt_every=1000)      # saves only when told to stop
  lock = os.path.join(workdir, workdir_lock.LOCK_FILE)
  run = run_dir.RunDir(workdir)

  # The first run reads its data through two grain workers. Paused, they hold the run at an early step,
  # waiting for its next batch.
  first = launch(workdir, dict(long_run, **{"data.workers": 2}), f"{logs}/1.log")
  wait_until(lambda: len(logged_steps(workdir)) >= 2, first, f"{logs}/1.log")
  workers = grain_workers(first)
  assert len(workers) == 2
  for worker in workers:
    os.kill(worker, signal.SIGSTOP)
  wait_until_idle(workdir, first, f"{logs}/1.log")

  # A second launch while the first one runs is refused, naming the holder.
  code, out = finish(launch(workdir, long_run, f"{logs}/2.log"), f"{logs}/2.log")
  assert code != 0 and f"is in use by pid {first.pid} on host {socket.gethostname()}, started " in out

  # Ctrl-C, then a SIGTERM, to the whole process group (a terminal, a scheduler), workers included: SIGINT
  # stops the run and the SIGTERM that comes while it stops is ignored. Each is sent once the run has logged
  # the one before: sent back to back, two signals may reach two threads of the run in either order. The
  # workers ignore both, deliver the batch, and the run saves (exit 130, no traceback).
  os.killpg(first.pid, signal.SIGINT)
  wait_until(lambda: says(f"{logs}/1.log", "SIGINT received: the run saves"), first, f"{logs}/1.log")
  os.killpg(first.pid, signal.SIGTERM)
  wait_until(lambda: says(f"{logs}/1.log", "SIGTERM received while stopping"), first, f"{logs}/1.log")
  os.killpg(first.pid, signal.SIGCONT)
  code, out = finish(first, f"{logs}/1.log")
  s1 = logged_steps(workdir)[-1]
  assert code == 130 and f"stopped by SIGINT: saved step {s1}" in out, out[-3000:]
  assert "SIGTERM received while stopping: ignored" in out and "Traceback" not in out
  assert run.saved_steps() == [s1]
  assert integrity.verify(os.path.join(run.checkpoints, str(s1)))
  assert os.path.getsize(lock) == 0                                   # released on a clean exit

  # SIGTERM saves the current step and exits 0.
  second = launch(workdir, long_run, f"{logs}/3.log")
  wait_until(lambda: logged_steps(workdir)[-1] > s1, second, f"{logs}/3.log")
  second.send_signal(signal.SIGTERM)
  code, out = finish(second, f"{logs}/3.log")
  s2 = logged_steps(workdir)[-1]
  assert code == 0 and f"resuming from step {s1}" in out and f"stopped by SIGTERM: saved step {s2}" in out

  # kill -9 in the middle of a checkpoint save (ckpt_every may change on resume): caught while its
  # temporary directory exists, paused, killed. The lock is left behind.
  third = launch(workdir, dict(long_run, ckpt_every=1), f"{logs}/4.log")
  while True:
    wait_until(lambda: checkpoints.temporary_dirs(run.checkpoints), third, f"{logs}/4.log", poll=0.001)
    pause(third)
    unfinished = checkpoints.temporary_dirs(run.checkpoints)
    if unfinished:
      break
    third.send_signal(signal.SIGCONT)                                 # committed meanwhile: the next save
  third.kill()
  third.wait()
  assert logged_steps(workdir)[-1] < TOTAL and json.loads(open(lock).read())["pid"] == third.pid

  # The last process takes the stale lock over, removes the unfinished save and finishes exactly as the
  # uninterrupted run.
  code, out = finish(launch(workdir, fields(data_dir), f"{logs}/5.log"), f"{logs}/5.log")
  assert code == 0, out[-3000:]
  assert f"taking over the stale lock {lock} of pid {third.pid}" in out and f"removing {unfinished[0]}" in out
  ref_dir, ref_metrics, ref_state = reference
  assert without_timing(read_metrics(workdir)) == without_timing(ref_metrics)
  assert_same_state(saved_state(workdir, TOTAL), ref_state)


def test_stop_signals_in_process(caplog):
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  done = []
  with preemption.stop_signals(lambda: done.append("saves finished")) as stop:
    assert not stop.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.reached(2) and stop.reason == "SIGTERM" and stop.exit_code == 0
  assert "SIGTERM received: the run saves a checkpoint" in caplog.text
  assert "SIGINT received while stopping: ignored" in caplog.text
  assert done == ["saves finished"] and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

  # The cleanups all run, in order, also when one fails (a save that failed in the background), and the
  # handlers are removed only after them.
  def failed_save():
    done.append(signal.getsignal(signal.SIGINT) == stop._handle)      # still installed
    raise OSError(28, "No space left on device")
  done.clear()
  with pytest.raises(OSError, match="No space left"):
    with preemption.stop_signals(failed_save, lambda: done.append("closed")) as stop:
      os.kill(os.getpid(), signal.SIGINT)
  assert stop.exit_code == 130 and done == [True, "closed"]
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ----------------------------------------------------------------------------------------------
# Flipped bytes, an unfinished save and a torn metrics line, all met by one resume.
# ----------------------------------------------------------------------------------------------
def test_corrupt_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path, data_dir, reference):  # noqa: F811
  ref_dir, ref_metrics, ref_state = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  assert run_dir.RunDir(workdir).saved_steps() == [TOTAL - 8, TOTAL - 4, TOTAL]
  # 8 bytes overwritten inside the largest data file of the newest checkpoint, same size.
  newest = os.path.join(workdir, "checkpoints", str(TOTAL))
  data = max((os.path.join(root, n) for root, _, names in os.walk(os.path.join(newest, "state")) for n in names),
             key=os.path.getsize)
  with open(data, "r+b") as f:
    f.seek(os.path.getsize(data) // 2)
    f.write(b"\xff" * 8)
  unfinished = os.path.join(workdir, "checkpoints", f"{TOTAL + 1}.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(unfinished, "state"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 25, "loss": 1.2')                              # a write cut short by a full disk

  # Resumed with a field that may change (the MFU's peak, not compared): the change is recorded with the step
  # the run resumed from, not the newest step it found.
  code, out = finish(launch(workdir, fields(data_dir, peak_tflops_per_device=2.0), str(tmp_path / "log")),
                     str(tmp_path / "log"))
  assert code == 0, out[-3000:]
  assert f"checkpoint {newest}: file {os.path.relpath(data, newest)} differs from its checksum" in out
  assert f"resuming from step {TOTAL - 4}, the newest that verifies" in out
  (entry,) = [json.loads(line) for line in open(run_dir.RunDir(workdir).config_changes_file)]
  assert entry["step"] == TOTAL - 4 and entry["changed"] == {"peak_tflops_per_device": [1.0, 2.0]}
  assert f"removing {unfinished}" in out and not os.path.exists(unfinished)
  assert "dropping the torn last line" in out
  aside = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.startswith(f"{TOTAL}.corrupt-")]
  assert len(aside) == 1                                             # kept for inspection, invisible to orbax
  # The last 4 steps were trained again exactly; their first logs were kept aside, not erased.
  assert without_timing(read_metrics(workdir)) == without_timing(ref_metrics)
  assert [m["step"] for m in read_metrics(workdir, dropped=True)] == list(range(TOTAL - 3, TOTAL + 1))
  assert_same_state(saved_state(workdir, TOTAL), ref_state)


# ----------------------------------------------------------------------------------------------
# A changed config on resume.
# ----------------------------------------------------------------------------------------------
def test_changed_config_is_refused_naming_each_field_and_config_json_stays(tmp_path, data_dir, reference):  # noqa: F811
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  changed = fields(data_dir, batch_size=4, seed=1, model__d_model=64, log_every=2)
  code, out = finish(launch(workdir, changed, str(tmp_path / "log")), str(tmp_path / "log"))
  assert code != 0
  for message in ("config.batch_size from 8 to 4", "config.seed from 0 to 1", "config.model.d_model from 32 to 64",
                  "--allow_config_change=batch_size,model.d_model,seed"):
    assert message in out
  assert "config.log_every from" not in out                           # a cadence may change
  # Forced through the check, the new width fails to restore: config.json stays as it was all the same.
  with pytest.raises(RuntimeError, match=r"checkpoint .*/24 could not be restored"):
    trainer.train_and_evaluate(config_of(fields(data_dir, model__d_model=64)), workdir,
                             allow_config_change=["model.d_model"])
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert not os.path.exists(run_dir.RunDir(workdir).config_changes_file)


def test_forced_and_allowed_changes_are_logged_and_recorded(tmp_path, data_dir, reference, caplog):  # noqa: F811
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  config = config_of(fields(data_dir, log_every=2, optim__lr=1e-3, nonfinite_skip_limit=3))
  with pytest.raises(config_resume.ConfigChangeError, match=r"config.optim.lr from 0.002 to 0.001"):
    trainer.train_and_evaluate(config, workdir)
  assert trainer.train_and_evaluate(config, workdir, allow_config_change=["optim"]) == 0
  assert "config.optim.lr changed on resume: 0.002 -> 0.001 (forced by --allow_config_change)" in caplog.text
  assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["lr"] == 1e-3
  (entry,) = [json.loads(line) for line in open(run_dir.RunDir(workdir).config_changes_file)]
  assert entry["step"] == TOTAL and entry["forced"] == ["optim.lr"]
  assert entry["changed"] == {"log_every": [1, 2], "nonfinite_skip_limit": [0, 3], "optim.lr": [0.002, 0.001]}


def test_a_workdir_recorded_before_newer_fields_existed_resumes(tmp_path, data_dir, reference):  # noqa: F811
  """The fields a record lacks take their values from before they existed (VALUES_BEFORE_FIELD_EXISTED, as
  train reads it) or, without such a value, today's default."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  path = run_dir.RunDir(workdir).config_file
  old = json.load(open(path))
  ema = old.pop("ema_decay")
  del old["nonfinite_skip_limit"], old["optim"]["grad_clip"]          # fields older tfusions did not have
  json.dump(old, open(path, "w"))
  config = config_of(fields(data_dir))
  with pytest.raises(config_resume.ConfigChangeError, match=rf"config.ema_decay from 0.0 to {ema}"):
    trainer.train_and_evaluate(config, workdir)      # a run recorded before EMA existed had none
  json.dump(dict(old, ema_decay=ema), open(path, "w"))
  assert trainer.train_and_evaluate(config, workdir) == 0                       # resumed at its last step
  recorded = json.load(open(path))
  assert recorded["nonfinite_skip_limit"] == 0 and "grad_clip" in recorded["optim"]   # recorded in full
  assert not os.path.exists(run_dir.RunDir(workdir).config_changes_file)


def test_resumed_checkpoints_without_a_recorded_config_are_warned_about(tmp_path, caplog):
  os.makedirs(tmp_path / "checkpoints" / "4")
  assert config_resume.check(config_lib.default_config(), str(tmp_path)) == {}
  assert "has checkpoints but no config.json: this config cannot be compared" in caplog.text
  with pytest.raises(config_lib.ConfigError, match=r"--allow_config_change names fields the config does not have: "
                                                   r"\['optim.no_such_field'\]"):
    config_resume.check(config_lib.default_config(), str(tmp_path), allow=("optim", "optim.no_such_field"))


# ----------------------------------------------------------------------------------------------
# Non-finite updates.
# ----------------------------------------------------------------------------------------------
def test_nan_override_saves_nothing_non_finite_and_skip_mode_skips(tmp_path, data_dir):  # noqa: F811
  # lr 3.4e38 (finite in float32, so validation lets it through): the first update after warmup overflows,
  # while the loss of that step, computed before the update, is finite. One checkpoint kept at most.
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log")
  blowing_up = fields(data_dir, total_steps=6, ckpt_every=1, max_to_keep=1, optim__lr=3.4e38,
                      optim__warmup_steps=1)
  code, out = finish(launch(workdir, blowing_up, log), log)
  assert code == 1
  assert "the train state after step 2 is not finite" in out and "last checkpoint: step 1" in out
  assert run_dir.RunDir(workdir).saved_steps() == [1]    # the good one was not pushed out
  good = saved_state(workdir, 1)
  assert nonfinite.all_finite(good)

  # Resumed with skipping on (a field that may change): steps 2 and 3 are skipped, the third in a row stops.
  with pytest.raises(nonfinite.NonFiniteUpdate, match=r"steps 2\.\.4 all had a non-finite loss or update"):
    trainer.train_and_evaluate(config_of(dict(blowing_up, nonfinite_skip_limit=2)), workdir)
  assert run_dir.RunDir(workdir).saved_steps() == [3]
  skipped = saved_state(workdir, 3)
  assert int(skipped["step"]) == 3
  assert_same_state({k: v for k, v in skipped.items() if k != "step"}, {k: v for k, v in good.items() if k != "step"})
  assert [(m["step"], m.get("skipped_steps")) for m in read_metrics(workdir)] == [(1, None), (2, 1), (3, 1)]


def poisoned_at_step(monkeypatch, bad_step):
  """The train step, but the params it returns after `bad_step` are NaN (the loss it reports is finite)."""
  real = step_lib.jit_train_step

  def make(*args, **kwargs):
    step = real(*args, **kwargs)

    def run(state, batch):
      poison = jnp.where(state.step + 1 == bad_step, jnp.nan, 1.0)     # before `step` consumes (donates) state
      new, metrics = step(state, batch)
      return new.replace(params=jax.tree.map(lambda x: x * poison, new.params)), metrics
    return run
  monkeypatch.setattr(step_lib, "jit_train_step", make)


def test_a_non_finite_state_after_a_finite_loss_is_not_saved(tmp_path, data_dir, monkeypatch):  # noqa: F811
  poisoned_at_step(monkeypatch, 3)
  workdir = str(tmp_path / "run")
  with pytest.raises(nonfinite.NonFiniteUpdate, match=r"after step 3 is not finite .* last checkpoint: step 2"):
    trainer.train_and_evaluate(config_of(fields(data_dir, total_steps=5, ckpt_every=1)), workdir)
  assert run_dir.RunDir(workdir).saved_steps() == [1, 2]
  assert np.isfinite(read_metrics(workdir)[-1]["loss"]) and read_metrics(workdir)[-1]["step"] == 3


def test_skip_mode_drops_one_bad_update_and_goes_on(tmp_path, data_dir, monkeypatch):  # noqa: F811
  poisoned_at_step(monkeypatch, 3)
  workdir = str(tmp_path / "run")
  config = config_of(fields(data_dir, total_steps=5, ckpt_every=1, max_to_keep=5, nonfinite_skip_limit=1))
  assert trainer.train_and_evaluate(config, workdir) == 0
  assert [m["skipped_steps"] for m in read_metrics(workdir)] == [0, 0, 1, 0, 0]
  before, skipped, after = (saved_state(workdir, s) for s in (2, 3, 4))
  assert int(skipped["step"]) == 3
  assert_same_state(skipped["params"], before["params"])
  assert_same_state(skipped["opt_state"], before["opt_state"])
  assert nonfinite.all_finite(after) and not np.array_equal(after["params"]["lm_head"]["kernel"],
                                                            skipped["params"]["lm_head"]["kernel"])


# ----------------------------------------------------------------------------------------------
# A full disk during a save.
# ----------------------------------------------------------------------------------------------
def test_a_full_disk_during_a_save_keeps_the_earlier_checkpoints(tmp_path, data_dir, reference):  # noqa: F811
  # No file the run writes may grow past 100 kB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write fails with
  # EFBIG as on a full disk): the metrics fit, the checkpoint's largest data file does not. The log goes
  # through a pipe, which the limit does not cover.
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log")
  shutil.copytree(reference[0], workdir)
  limited = ("bash", "-c", 'set -o pipefail; prlimit --fsize=100000 "$@" 2>&1 | cat', "bash")
  code, out = finish(launch(workdir, fields(data_dir, total_steps=TOTAL + 2, ckpt_every=2), log, prefix=limited), log)
  assert code == 1 and re.search(rf"Failed writing: .*/checkpoints/{TOTAL + 2}{integrity.TMP_SUFFIX}/.*File too large",
                                 out), out[-3000:]
  assert run_dir.RunDir(workdir).saved_steps() == [TOTAL - 8, TOTAL - 4, TOTAL]
  for step in (TOTAL - 8, TOTAL - 4, TOTAL):
    assert integrity.verify(os.path.join(workdir, "checkpoints", str(step)))


def test_a_failed_save_still_closes_everything(tmp_path, data_dir, monkeypatch):  # noqa: F811
  """The background save fails (disk full, a hashing error) and wait() raises it: the checkpointer and
  the writer are closed all the same, the signal handlers removed, the lock released."""
  monkeypatch.setattr(checkpoints.Checkpointer, "wait", raising(OSError(28, "No space left on device")))
  closed = []
  monkeypatch.setattr(checkpoints.Checkpointer, "close", lambda self: closed.append(self.manager.close()))
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  workdir = str(tmp_path / "run")
  with pytest.raises(OSError, match="No space left"):
    trainer.train_and_evaluate(config_of(fields(data_dir, total_steps=1)), workdir)
  assert closed == [None] and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  assert os.path.getsize(os.path.join(workdir, workdir_lock.LOCK_FILE)) == 0


# ----------------------------------------------------------------------------------------------
# The lock of the VAE trainer and of prepare; metrics history without a checkpoint.
# ----------------------------------------------------------------------------------------------
def test_vae_training_and_prepare_refuse_a_locked_directory_and_take_over_a_stale_lock(tmp_path, caplog):
  directory = str(tmp_path / "dir")
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tfusion import workdir_lock; "
                             "lock = workdir_lock.hold(sys.argv[1]); lock.__enter__(); print('held', flush=True); "
                             "time.sleep(600)", directory], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    named = rf"is in use by pid {holder.pid} on host {socket.gethostname()}, started"
    vae_config = config_lib.default_vae_config()
    vae_config.mesh.ici_data_parallelism = 3          # were the lock not to refuse, the mesh would (8 devices)
    with pytest.raises(workdir_lock.DirectoryInUse, match=named):
      train_vae.train_vae(vae_config, directory)
    prepare_config = config_lib.default_prepare_config()
    prepare_config.path = str(tmp_path / "no_such_folder")
    with pytest.raises(workdir_lock.DirectoryInUse, match=named):
      prepare_lib.prepare(prepare_config, directory)
  finally:
    holder.kill()
    holder.wait()
  with workdir_lock.hold(directory):
    assert json.load(open(os.path.join(directory, workdir_lock.LOCK_FILE)))["pid"] == os.getpid()
  assert f"of pid {holder.pid} on host" in caplog.text and "that process is gone" in caplog.text


def test_the_lock_holds_within_its_own_process_and_is_dropped_on_errors(tmp_path, monkeypatch):
  directory, lock = str(tmp_path / "dir"), str(tmp_path / "dir" / workdir_lock.LOCK_FILE)
  with workdir_lock.hold(directory):
    assert json.load(open(lock))["pid"] == os.getpid()                # reading the record keeps the lock
    with pytest.raises(workdir_lock.DirectoryInUse, match=rf"is in use by pid {os.getpid()} "):
      with workdir_lock.hold(directory):
        pass
    assert json.load(open(lock))["pid"] == os.getpid()
  assert os.path.getsize(lock) == 0
  fails = raising(OSError(28, "No space left on device"))
  for name in ("fsync", "ftruncate"):       # recording the holder, then (ftruncate) emptying the record too
    with monkeypatch.context() as patch:
      patch.setattr(workdir_lock.os, name, fails)
      with pytest.raises(OSError, match="No space left"):
        with workdir_lock.hold(directory):
          pass
    with workdir_lock.hold(directory):      # the failed holder closed its file: the lock is free
      pass
  with pytest.raises(OSError, match="No space left"):
    with workdir_lock.hold(directory):
      monkeypatch.setattr(workdir_lock.os, "ftruncate", fails)        # only the release fails
  monkeypatch.undo()
  with workdir_lock.hold(directory):
    pass


def test_history_without_checkpoints_is_kept_aside(tmp_path, data_dir, reference, caplog):  # noqa: F811
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  trainer.train_and_evaluate(config_of(fields(data_dir, total_steps=2)), workdir)
  assert [m["step"] for m in read_metrics(workdir)] == [1, 2]
  assert [m["step"] for m in read_metrics(workdir, dropped=True)] == list(range(1, TOTAL + 1))
  assert f"{TOTAL} entries of steps 1..{TOTAL} were logged after step 0" in caplog.text
