"""One command per directory: a lock on <dir>/tfusion.lock that names its holder.

tfusion.train, tfusion.train_vae and tfusion.prepare hold the lock of their directory while they run. A
second one on the same directory (a retried job, a double submit) refuses, naming the holder: host, pid,
start time and command line. The lock is an open-file-description lock (fcntl F_OFD_SETLK, Linux >= 3.15)
on the file: it belongs to the holder's open file, not to its process, so a second hold() in the same
process is refused like any other, and opening and closing the lock file elsewhere in the process (to
read the record) leaves it held. The kernel releases it when the file is closed, at the latest when the
process ends, however it ends (kill -9, OOM, a lost VM); a child started by fork without exec shares it
until it ends too. The file keeps the holder's record while it runs and is emptied on a clean exit, so a
record found under a free lock is a stale lock of a process that died: the newcomer says so and takes it
over.

In a multi-process run process 0 holds the lock for all; every process fails if it cannot get it.

Limits (docs/reliability.md): the lock is as good as the filesystem's POSIX locks (OFD locks are POSIX
record locks with another owner). Local disks and NFSv4 (NFSv3 with lockd) lock across hosts; gcsfuse,
NFS mounted with `nolock` and Lustre without `-o flock` lock only within a host, so two launches on
different hosts are not stopped there. The lock file is never deleted (deleting it would let two
processes lock two different files).
"""
import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import struct
import sys

from absl import logging

from tfusion import distributed

LOCK_FILE = "tfusion.lock"
# struct flock of a write lock on the whole file; l_pid must be 0 for an open-file-description lock.
_WHOLE_FILE = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


class DirectoryInUse(RuntimeError):
  """Another live process holds the directory's lock; the message names it."""


def describe(holder) -> str:
  if not isinstance(holder, dict):
    return f"an unknown process (lock record {holder!r})"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
          f"({holder.get('command')})")


def _read(fd: int):
  raw = os.pread(fd, 1 << 16, 0)
  if not raw.strip():
    return None
  try:
    return json.loads(raw)
  except ValueError:
    return raw.decode(errors="replace")


def _acquire(directory: str) -> int:
  """The open, locked lock file of `directory`, holding this process's record."""
  path = os.path.join(directory, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WHOLE_FILE)
    except OSError as e:
      if e.errno not in (errno.EACCES, errno.EAGAIN):
        raise OSError(e.errno, f"cannot lock {path} ({e.strerror}): this filesystem (or a Linux kernel before "
                      "3.15) has no open-file-description locks (see docs/reliability.md)") from e
      raise DirectoryInUse(f"{directory} is in use by {describe(_read(fd))}: lock {path}. Wait for it to end or "
                           "stop it; a lock left by a process that died is taken over by itself.") from None
    previous = _read(fd)
    if previous is not None:
      logging.warning("taking over the stale lock %s of %s: that process is gone", path, describe(previous))
    record = dict(host=socket.gethostname(), pid=os.getpid(),
                  started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=" ".join(sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    os.fsync(fd)
  except BaseException:
    os.close(fd)              # drops the lock, if it was taken
    raise
  return fd


def _release(fd: int) -> None:
  try:
    os.ftruncate(fd, 0)     # empty: released cleanly
  finally:
    os.close(fd)            # drops the lock


@contextlib.contextmanager
def hold(directory: str):
  """Hold the lock of `directory` (made if missing, by every process) for the body; DirectoryInUse if a
  live process (or another hold() of this one) has it."""
  os.makedirs(directory, exist_ok=True)
  fd = distributed.chief_only(f"locking {directory}", lambda: _acquire(directory))
  try:
    yield
  finally:
    if fd is not None:
      _release(fd)
