"""Two local processes (4 CPU devices each, JAX's gloo collectives) train exactly like one process
with 8 devices, write one set of logs, and save and restore checkpoints together, also onto a
hybrid (dcn x ici) mesh; the run then resumes on one process, with the same data continuation. Ctrl-C on
one process, or a SIGTERM, stops both at one step, saved, and the run resumes bit-exactly."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tfusion import integrity, run_dir
from tfusion.metrics import read_metrics
from tests.helpers import assert_same_state, saved_state, without_timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("loss", "text_loss", "image_loss", "grad_norm", "text_targets", "images")


def overrides(data_dir, total_steps):
  """A tiny run on a (data 2, fsdp 2, tensor 2) mesh; constant lr after warmup, so a run stopped at
  step 4 and resumed to 6 follows the same schedule as a straight 6-step run."""
  return [f"--config.total_steps={total_steps}", "--config.batch_size=8", "--config.seq_len=64",
          "--config.log_every=1", "--config.ckpt_every=2", "--config.sample_every=100",
          "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
          "--config.model.mlp_dim=64", "--config.model.patch_size=4", "--config.data.vocab_size=512",
          f"--config.data.data_dir={data_dir}", "--config.optim.warmup_steps=2", "--config.optim.final_lr_fraction=1.0",
          "--config.sample.num_images=2", "--config.sample.num_captions=2", "--config.sample.diffusion_steps=4",
          "--config.sample.max_caption_tokens=4", "--config.mesh.ici_data_parallelism=2",
          "--config.mesh.ici_fsdp_parallelism=2", "--config.mesh.ici_tensor_parallelism=2"]


def launch(workdir, data_dir, total_steps, devices, extra=()):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, "-m", "tfusion.train", "--config", "experiments/shapes_tiny.py:16", "--workdir", workdir,
         *overrides(data_dir, total_steps), *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(processes, timeout=400):
  outputs = [p.communicate(timeout=timeout)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def two_launched(workdir, data_dir, total_steps, extra=()):
  port = free_port()
  return [launch(workdir, data_dir, total_steps, 4, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                     f"--process_id={i}", *extra]) for i in range(2)]


def two_processes(workdir, data_dir, total_steps, extra=()):
  return wait(two_launched(workdir, data_dir, total_steps, extra))


def wait_for_steps(workdir, processes, count):
  metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 400
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= count):
    assert time.time() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.1)


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_together(tmp_path, data_dir):  # noqa: F811
  wait([launch(str(tmp_path / "one"), data_dir, 8, 8)])
  one = read_metrics(str(tmp_path / "one"))

  two = str(tmp_path / "two")
  two_processes(two, data_dir, 4)
  assert [m["step"] for m in read_metrics(two)] == [1, 2, 3, 4]           # one writer, not two
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]
  data_states = sorted(os.listdir(os.path.join(two, "checkpoints", "4", "data")))
  assert [f for f in data_states if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]
  assert os.path.exists(os.path.join(two, "samples", "step_4", "images.png"))

  # Resume from step 4 on a hybrid mesh: data parallel across the processes (dcn), fsdp x tensor within
  # each; the same (2, 2, 2) shape with another device order, so the restore re-lays out the state.
  outputs = two_processes(two, data_dir, 6, ["--config.mesh.ici_data_parallelism=1",
                                             "--config.mesh.dcn_data_parallelism=2"])
  assert any("resuming from step 4" in out for out in outputs)
  assert [m["step"] for m in read_metrics(two)] == [1, 2, 3, 4, 5, 6]

  # The host count changes: one process takes every row stream's position from both processes' files.
  outputs = wait([launch(two, data_dir, 8, 8)])
  assert "resuming from step 6" in outputs[0]
  resumed = read_metrics(two)
  assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6, 7, 8]
  for a, b in zip(one, resumed):
    for k in COMPARED:
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f"step {a['step']} {k}")


@pytest.mark.slow
def test_ctrl_c_and_sigterm_on_one_process_stop_both_and_resume_bit_exactly(tmp_path, data_dir):  # noqa: F811
  total = 12
  two_processes(str(tmp_path / "straight"), data_dir, total, ["--config.ckpt_every=1000"])

  workdir, long_run = str(tmp_path / "run"), ["--config.ckpt_every=1000"]
  processes = two_launched(workdir, data_dir, 1000, long_run)
  wait_for_steps(workdir, processes, 2)
  processes[0].send_signal(signal.SIGINT)          # forwarded to JAX's preemption notifier as a SIGTERM
  outputs = [p.communicate(timeout=400)[0] for p in processes]
  assert [p.returncode for p in processes] == [130, 0], outputs[0][-3000:]
  s1 = read_metrics(workdir)[-1]["step"]
  assert f"stopped by SIGINT: saved step {s1}" in outputs[0]
  assert f"stopped by a signal to one of the processes: saved step {s1}" in outputs[1]
  assert run_dir.RunDir(workdir).saved_steps() == [s1]
  assert integrity.verify(os.path.join(workdir, "checkpoints", str(s1)))    # both processes' files
  assert any("this process hashed its" in out for out in outputs[1:])      # process 1 hashed its own

  # A SIGTERM to process 1 (JAX's notifier has it): both stop at one step, saved, exit 0.
  processes = two_launched(workdir, data_dir, 1000, long_run)
  wait_for_steps(workdir, processes, s1 + 2)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=400)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[1][-3000:]
  s2 = read_metrics(workdir)[-1]["step"]
  assert s2 < total and all(f"stopped by a signal to one of the processes: saved step {s2}" in o for o in outputs)
  assert f"resuming from step {s1}" in outputs[0]

  # Resumed to the end: the same as the straight run, bit for bit.
  outputs = two_processes(workdir, data_dir, total, long_run)
  assert f"resuming from step {s2}" in outputs[0]
  straight = str(tmp_path / "straight")
  assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(straight))
  assert_same_state(saved_state(workdir, total), saved_state(straight, total))
