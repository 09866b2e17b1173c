"""Checksums of what a checkpoint wrote, checked before it is restored.

Orbax commits a checkpoint by renaming <dir>/<step>.orbax-checkpoint-tmp to <dir>/<step> once every process
has written its files. Just before that rename, <step>/checksums.json gets {relative path: {"bytes": n,
"sha256": hex}} of every file of the step, so a committed checkpoint always carries its checksums. The
hashing is spread over the processes, each reading back what it wrote:

  write_part      each process, once its own files are written (before the processes meet for the commit):
                  the files named after it (orbax's ocdbt.process_<p>/ and array_metadatas/process_<p>,
                  grain's data/process_<p>-of-<n>.json) into checksums-process_<p>.json, under the paths
                  they get at the commit (orbax writes each item into <item>.orbax-checkpoint-tmp and
                  renames it then).
  write_manifest  process 0, just before the rename: merges the parts with the hashes of the files no part
                  lists (the metadata orbax writes for all processes, some at the commit; every file when no
                  part was written, as in a single-process run) into checksums.json, and removes the parts.
  verify          before a restore: re-hashes the files; a flipped byte, a truncated, missing or unreadable
                  file names the step and the file.

Not hashed: orbax's step metadata _CHECKPOINT_METADATA (orbax stamps the commit time into it after the
hashing); verify only checks that it is a JSON object. A checkpoint without checksums.json is one saved
before tfusion wrote checksums (restored unverified, with a warning), unless its step metadata carries
MARK (tfusion saves it into every checkpoint it hashes) or an older checkpoint beside it has checksums:
then its checksums.json was lost, and it counts as corrupt.
"""
import contextlib
import glob
import hashlib
import json
import os
import re

TMP_SUFFIX = ".orbax-checkpoint-tmp"      # orbax's name for a directory still being written
MANIFEST = "checksums.json"
PART = "checksums-process_{}.json"        # one process's hashes, merged into MANIFEST by process 0
STEP_METADATA = "_CHECKPOINT_METADATA"    # orbax's step metadata
MARK = {"tfusion_checksums": MANIFEST}    # orbax custom_metadata of every checkpoint saved with checksums


class CorruptCheckpoint(RuntimeError):
  """A checkpoint's files differ from its checksums; the message names the step directory and the file."""


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(step_dir: str, process: int | None = None) -> list[str]:
  """Relative paths of the files orbax and grain wrote under step_dir (not the checksums, not the step
  metadata), sorted; with `process`, only those named after that process."""
  found = []
  for root, _, names in os.walk(step_dir):
    found += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  ours = re.compile(rf"(.*\.)?process_{process}(-of-\d+\.json)?")
  return sorted(f for f in found if f != STEP_METADATA and not f.startswith("checksums")
                and (process is None or any(ours.fullmatch(part) for part in f.split(os.sep))))


def _hashes(step_dir: str, names) -> dict:
  return {name: {"bytes": os.path.getsize(os.path.join(step_dir, name)),
                 "sha256": sha256_of(os.path.join(step_dir, name))} for name in names}


def write_part(step_dir: str, process: int) -> int:
  """Hashes the files of step_dir named after `process` into its part; returns their total size."""
  entries = {name.replace(TMP_SUFFIX + os.sep, os.sep): entry
             for name, entry in _hashes(step_dir, _files(step_dir, process)).items()}
  with open(os.path.join(step_dir, PART.format(process)), "w") as f:
    json.dump(entries, f)
  return sum(e["bytes"] for e in entries.values())


def write_manifest(step_dir: str) -> None:
  """step_dir/checksums.json: the parts, and the hashes of every file they do not list (also of those of a
  part cut short, e.g. by a full disk); removes the parts."""
  parts = glob.glob(os.path.join(step_dir, PART.format("*")))
  entries = {}
  for part in parts:
    with open(part) as f, contextlib.suppress(ValueError):
      entries.update(json.load(f))
  entries.update(_hashes(step_dir, [f for f in _files(step_dir) if f not in entries]))
  with open(os.path.join(step_dir, MANIFEST), "w") as f:
    json.dump(entries, f, indent=1, sort_keys=True)
  for part in parts:
    os.remove(part)


def verify(step_dir: str, item: str | None = None) -> bool:
  """True if the files of step_dir (with `item`, only those under step_dir/item) match its checksums.json;
  False if it has none and none is due (saved before tfusion wrote checksums). CorruptCheckpoint naming the
  step directory and the file otherwise: checksums.json due but missing, unreadable or malformed; the step
  metadata not a JSON object; a file missing, unreadable, of another size or of other content."""
  metadata = _step_metadata(step_dir)
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(path):
    why = _manifest_due(step_dir, metadata)
    if why:
      raise CorruptCheckpoint(f"checkpoint {step_dir}: {MANIFEST} is missing, although {why}")
    return False
  try:
    with open(path) as f:
      expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in json.load(f).items()}
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise CorruptCheckpoint(f"checkpoint {step_dir}: unreadable {MANIFEST} ({type(e).__name__}: {e})") from e
  for name, (size, digest) in sorted(expected.items()):
    if item and not name.startswith(item + "/"):
      continue
    file = os.path.join(step_dir, name)
    if not os.path.isfile(file):
      raise CorruptCheckpoint(f"checkpoint {step_dir}: file {name} is missing")
    try:
      actual_size, actual = os.path.getsize(file), sha256_of(file)
    except OSError as e:
      raise CorruptCheckpoint(f"checkpoint {step_dir}: file {name} cannot be read ({e})") from e
    if actual_size != size:
      raise CorruptCheckpoint(f"checkpoint {step_dir}: file {name} has {actual_size} bytes, {size} were written")
    if actual != digest:
      raise CorruptCheckpoint(f"checkpoint {step_dir}: file {name} differs from its checksum (same size, "
                              "other content)")
  return True


def _step_metadata(step_dir: str) -> dict | None:
  """orbax's step metadata of step_dir (None if there is none); CorruptCheckpoint if it is not a JSON object."""
  path = os.path.join(step_dir, STEP_METADATA)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise CorruptCheckpoint(f"checkpoint {step_dir}: unreadable {STEP_METADATA} ({type(e).__name__}: {e})") from e
  if not isinstance(metadata, dict):
    raise CorruptCheckpoint(f"checkpoint {step_dir}: {STEP_METADATA} is not a JSON object")
  return metadata


def _manifest_due(step_dir: str, metadata: dict | None) -> str | None:
  """Why step_dir must have checksums.json (None if it may be from before tfusion wrote them)."""
  custom = (metadata or {}).get("custom_metadata")
  if isinstance(custom, dict) and MARK.items() <= custom.items():
    return f"its {STEP_METADATA} says it was saved with one"
  parent, name = os.path.split(os.path.normpath(step_dir))
  if not name.isdigit():
    return None
  older = [int(n) for n in os.listdir(parent) if n.isdigit() and int(n) < int(name)
           and os.path.isfile(os.path.join(parent, n, MANIFEST))]
  return f"the older checkpoint {os.path.join(parent, str(max(older)))} has one" if older else None
