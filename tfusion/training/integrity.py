"""Checksums of what a checkpoint wrote, checked before it is restored.

Orbax commits a checkpoint by renaming <dir>/<step>.orbax-checkpoint-tmp to <dir>/<step>. Just before that
rename, process 0 writes <step>/checksums.json: {relative path: {"bytes": n, "sha256": hex}} of every
file of the step but orbax's _CHECKPOINT_METADATA (times; orbax rewrites it at the commit) (all processes'
files: the checkpoint directory is shared, docs/scaling.md), so a
committed checkpoint always carries its checksums. Restoring first re-hashes the files: a flipped byte,
a truncated or missing file names the step and the file. Checkpoints without checksums.json (written
before tfusion had them) are restored unverified, with a warning.
"""
import hashlib
import json
import os

MANIFEST = "checksums.json"
UNCHECKED = ("_CHECKPOINT_METADATA",)     # orbax's step metadata: it stamps the commit time in after our hashing
TMP_SUFFIX = ".orbax-checkpoint-tmp"      # orbax's name for a step directory still being written


class CorruptCheckpoint(RuntimeError):
  """A checkpoint's files differ from its checksums; the message names the step directory and the file."""


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
  """Relative paths of the regular files under step_dir (the manifest aside), sorted."""
  found = []
  for root, _, names in os.walk(step_dir):
    found += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in found if f not in (MANIFEST, MANIFEST + ".tmp", *UNCHECKED))


def write_manifest(step_dir: str) -> None:
  """Hashes every file of step_dir into step_dir/checksums.json (written to a .tmp file, then renamed)."""
  entries = {f: {"bytes": os.path.getsize(os.path.join(step_dir, f)), "sha256": sha256_of(os.path.join(step_dir, f))}
             for f in _files(step_dir)}
  path = os.path.join(step_dir, MANIFEST)
  with open(path + ".tmp", "w") as out:
    json.dump(entries, out, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def verify(step_dir: str) -> bool:
  """True if step_dir matches its checksums.json, False if it has none; CorruptCheckpoint naming the
  step directory and the first file that is missing, of another size or of other content."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(path):
    return False
  try:
    with open(path) as f:
      entries = json.load(f)
  except (OSError, ValueError) as e:
    raise CorruptCheckpoint(f"checkpoint {step_dir}: unreadable {MANIFEST} ({e})") from e
  for name, expected in sorted(entries.items()):
    file = os.path.join(step_dir, name)
    if not os.path.isfile(file):
      raise CorruptCheckpoint(f"checkpoint {step_dir}: file {name} is missing")
    if os.path.getsize(file) != expected["bytes"]:
      raise CorruptCheckpoint(f"checkpoint {step_dir}: file {name} has {os.path.getsize(file)} bytes, "
                              f"{expected['bytes']} were written")
    if sha256_of(file) != expected["sha256"]:
      raise CorruptCheckpoint(f"checkpoint {step_dir}: file {name} differs from its checksum (same size, "
                              "other content)")
  return True


def temporary_dirs(directory: str) -> list[str]:
  """Step directories orbax began and never committed (a save cut short by a kill or a crash)."""
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, n) for n in os.listdir(directory) if TMP_SUFFIX in n)
