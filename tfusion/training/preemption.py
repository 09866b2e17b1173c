"""Stop a training loop at a step on SIGTERM or SIGINT, so that it saves there and exits cleanly.

SIGTERM is how schedulers and clouds end a job (a spot VM's preemption, SLURM's time limit or scancel,
`kill`); SIGINT is Ctrl-C. Once handlers are installed, either signal only asks the loop to stop: the loop
finishes the step it is in, saves a checkpoint at that step and returns. Further signals while it does so
are logged and ignored, so they cannot cut the save short (SIGKILL still can: orbax's atomic commit then
leaves the previous checkpoints as they were).

Several processes must stop at the same step. There JAX's preemption notifier (set up by
jax.distributed.initialize) owns SIGTERM and `multihost_utils.reached_preemption_sync_point` agrees on
the step; SIGINT is forwarded to it as a SIGTERM of this process. The notifier catches SIGTERM from
jax.distributed.initialize on, so a SIGTERM during setup there stops the run at its first step, saved;
and since the notifier does not say which process was signalled, every process but one that received a
SIGINT reports "a signal to one of the processes".

stop_signals() installs the handlers for a training loop and tears down around it in the right order.
"""
import contextlib
import os
import signal

from absl import logging
import jax
from jax.experimental import multihost_utils

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}   # SIGINT: the shell's 130


class StopSignals:
  """install() just before the loop (stop_signals() does), reached(step) after every step, uninstall() after.

  signum: the first signal this process received (None if none); exit_code: the process's exit status
  after a clean stop (0 for SIGTERM, 130 for SIGINT)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def install(self) -> None:
    ours = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
    for signum in ours:
      self._previous[signum] = signal.signal(signum, self._handle)

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signum is not None:
      logging.warning("%s received while stopping: ignored, the checkpoint save goes on", name)
      return
    self.signum = signum
    logging.warning("%s received: the run saves a checkpoint after the current step and stops", name)
    if jax.process_count() > 1 and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)      # JAX's notifier tells the other processes

  def reached(self, step: int) -> bool:
    """True once a stop was asked for: at this step every process saves and stops."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  @property
  def reason(self) -> str:
    return signal.Signals(self.signum).name if self.signum else "a signal to one of the processes"

  @property
  def exit_code(self) -> int:
    return EXIT_CODES.get(self.signum, 0)


@contextlib.contextmanager
def stop_signals(*cleanups):
  """StopSignals installed for the body (and yielded). On the way out, also after an error, the `cleanups`
  run in their order, each even if one before it raised (e.g. wait for the checkpoint saves, then close
  the checkpointer and the writers), and only then are the handlers removed: a signal during the last
  save is still only logged, and no handler outlives the loop in the process."""
  stop = StopSignals()
  with contextlib.ExitStack() as stack:
    stack.callback(stop.uninstall)
    for cleanup in reversed(cleanups):
      stack.callback(cleanup)
    stop.install()
    yield stop
