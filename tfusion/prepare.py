r"""Turn a raw source into a prepared dataset (array_record shards, see tfusion.data.prepared).

  python -m tfusion.prepare --config experiments/prepare.py:coco --out /data/coco_256
  python -m tfusion.prepare --config experiments/prepare.py:folder --config.path ~/cc12m --out /data/cc12m_256
  python -m tfusion.prepare --config experiments/prepare.py:jsonl --config.path ~/corpus.jsonl --out /data/text

Each split is cut into shards of config.examples_per_shard examples. Shard i of a multi-process job is
prepared by process i mod process_count, with config.workers worker processes reading, decoding and
tokenizing (images are encoded to latents, with config.vae, batched on this process's devices). A finished
shard is renamed into place and followed by its `<shard>.json`; running the same command again skips
finished shards, so an interrupted job resumes. Bad records are skipped and listed in skipped.jsonl, and
counted by reason in the manifest, which process 0 writes last. A second job on the same directory is
refused while the first runs (tfusion.workdir_lock).
"""
import dataclasses
import hashlib
import json
import multiprocessing
import os

from absl import app, flags, logging
from array_record.python import array_record_module
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np
import tqdm

from tfusion import codecs, config as config_lib, distributed, run_dir, workdir_lock
from tfusion.data import latent_cache, prepared, raw_sources, tokenizer as tokenizer_lib
from tfusion.data.images import BadRecord
from tfusion.integrity import sha256_of

SETTINGS_FILE = "prepare_config.json"   # the settings the directory is prepared with (resuming checks them)
IMAGE_FIELDS = ("image", "input_image", "output_image")   # each becomes <prefix>latents, or <prefix>codes (VQ)


@dataclasses.dataclass(frozen=True)
class ShardJob:
  split: str
  index: int
  count: int
  start: int
  stop: int

  @property
  def file(self) -> str:
    return prepared.shard_file(self.split, self.index, self.count)


def make_reader(config):
  if config.source == "image_folder":
    return raw_sources.ImageFolder(config.path, config.split, config.captions)
  if config.source == "jsonl":
    return raw_sources.TextJsonl(config.path, config.split, config.examples_per_shard)
  if config.source == "edit_jsonl":
    return raw_sources.EditJsonl(config.path, config.split, config.examples_per_shard)
  t = config.tfds
  return raw_sources.Tfds(config.path, t.splits, t.data_dir, t.kind, t.image_key, t.caption_key, t.text_key)


def shard_jobs(reader, examples_per_shard: int) -> list[ShardJob]:
  jobs = []
  for split in reader.splits():
    n = reader.count(split)
    count = max(1, -(-n // examples_per_shard))
    jobs += [ShardJob(split, i, count, i * examples_per_shard, min(n, (i + 1) * examples_per_shard))
             for i in range(count)]
  return jobs


# ----------------------------------------------------------------------------------------------
# One shard: read and convert its records (in a worker), encode latents and write it (in the main process).
# ----------------------------------------------------------------------------------------------
_WORKER = {}    # what build_records reads: set by start_worker in every worker process (and inline)


def start_worker(reader, settings: str, out: str) -> None:
  """Pool initializer: the reader (its file list or line offsets come pickled, not re-scanned), the
  settings and, for text, the tokenizer."""
  config = config_lib.from_json(settings, SETTINGS_FILE, config_lib.default_prepare_config())
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(out, run_dir.TOKENIZER_FILE)) if reader.kind == "text" else None
  _WORKER.update(reader=reader, config=config, tokenizer=tokenizer)


def build_records(job: ShardJob) -> tuple[ShardJob, list[dict], list[dict]]:
  """(job, records, skipped) of one shard; skipped entries are {"split", "id", "reason"}."""
  reader, config, tokenizer = _WORKER["reader"], _WORKER["config"], _WORKER["tokenizer"]
  records, skipped = [], []
  for id_, raw in reader.read(job.split, job.start, job.stop):
    try:
      if reader.kind == "text":
        records.append(raw_sources.text_record(raw, tokenizer))
      elif reader.kind == "edit":
        records.append(raw_sources.edit_record(raw, config.image_size, config.min_image_size))
      else:
        records.append(raw_sources.image_caption_record(raw, config.image_size, config.min_image_size))
    except BadRecord as e:
      skipped.append({"split": job.split, "id": id_, "reason": str(e)})
  return job, records, skipped


def built_shards(reader, settings: str, out: str, jobs: list[ShardJob], workers: int):
  """(job, records, skipped) of every job in order; with workers, at most 2 shards per worker are in flight, so
  finished shards never pile up in memory while the main process encodes and writes."""
  if not workers:
    start_worker(reader, settings, out)
    yield from map(build_records, jobs)
    return
  with multiprocessing.get_context("spawn").Pool(workers, start_worker, (reader, settings, out)) as pool:
    window = 2 * workers
    for begin in range(0, len(jobs), window):
      yield from pool.imap(build_records, jobs[begin:begin + window])


def encode_images(codec, records: list[dict], statistics) -> None:
  """Replaces every image field of `records` by the VAE's raw latents, or the VQ-VAE's codes (in place)."""
  discrete = isinstance(codec, codecs.VqCodec)
  for image_key in IMAGE_FIELDS:
    if records and image_key in records[0]:
      images = np.stack([r.pop(image_key) for r in records])
      encoded = codec.codes(images) if discrete else codec.raw_latents(images)
      statistics.add(encoded)
      field = image_key.removesuffix("image") + ("codes" if discrete else "latents")
      for record, value in zip(records, encoded):
        record[field] = value


def write_shard(out: str, job: ShardJob, records: list[dict], skipped: list[dict], codec) -> dict:
  """Writes the shard (temporary file, then rename) and then its .json; returns that summary."""
  moments = None
  if codec is not None:
    moments = latent_cache.statistics_of(codec)
    encode_images(codec, records, moments)
  path = os.path.join(out, job.file)
  writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
  try:
    for record in records:
      writer.write(prepared.encode_record(record))
  finally:
    writer.close()
  os.replace(path + ".tmp", path)
  summary = dict(file=job.file, split=job.split, examples=len(records), bytes=os.path.getsize(path),
                 sha256=sha256_of(path), skipped=skipped,
                 moments=None if moments is None or not moments.count else moments.to_json())
  _write_json(path + ".json", summary)
  return summary


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------------------
def check_settings(config, reader, out: str) -> str:
  """The settings and the source's fingerprint as JSON; a directory begun with other settings or from a changed
  source is refused (workers may differ)."""
  settings = config.to_dict()
  settings.pop("workers")
  settings["source_fingerprint"] = {split: reader.fingerprint(split) for split in reader.splits()}
  text = json.dumps(settings, indent=2, sort_keys=True)
  path = os.path.join(out, SETTINGS_FILE)
  if os.path.isfile(path) and _read_json(path) != json.loads(text):
    raise config_lib.ConfigError(f"{out} was begun with other settings or from another state of the source "
                                 f"({path}); prepare into a new directory, or restore those settings to resume")
  if distributed.is_chief():
    _write_json(path, json.loads(text))
  settings.pop("source_fingerprint")
  return json.dumps(dict(settings, workers=0))


def prepare_tokenizer(config, reader, out: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer of a text source: config.tokenizer, or one trained on the first documents."""
  path = os.path.join(out, run_dir.TOKENIZER_FILE)
  if os.path.isfile(path):
    return tokenizer_lib.Tokenizer.load(path)
  if config.tokenizer:
    tok = tokenizer_lib.Tokenizer.load(os.path.expanduser(config.tokenizer))
  else:
    def sample():
      for split in reader.splits():
        for _, raw in reader.read(split, 0, min(reader.count(split), config.tokenizer_sample)):
          try:
            yield raw_sources.decode_text(raw, "text")
          except BadRecord:
            continue
        return                  # the first split only
    logging.info("training a %d-piece tokenizer on up to %d documents", config.vocab_size, config.tokenizer_sample)
    tok = tokenizer_lib.train_tokenizer(sample(), config.vocab_size)
  tok.save(path)
  return tok


def write_manifest(config, reader, out: str, jobs: list[ShardJob], codec) -> dict:
  """Collects the shard summaries into manifest.json, skipped.jsonl and (with latents) codec.json."""
  summaries = [_read_json(os.path.join(out, job.file + ".json")) for job in jobs]
  splits, moments = {}, {}
  with open(os.path.join(out, prepared.SKIPPED + ".tmp"), "w") as report:
    for s in summaries:
      split = splits.setdefault(s["split"], dict(examples=0, skipped=0, skipped_by_reason={}, bytes=0, shards=[]))
      split["examples"] += s["examples"]
      split["bytes"] += s["bytes"]
      split["shards"].append({k: s[k] for k in ("file", "examples", "bytes", "sha256")})
      for entry in s["skipped"]:
        report.write(json.dumps(entry) + "\n")
        reason = entry["reason"].split(":")[0]
        split["skipped"] += 1
        split["skipped_by_reason"][reason] = split["skipped_by_reason"].get(reason, 0) + 1
      if s["moments"]:
        shard = latent_cache.statistics_from_json(s["moments"])
        if s["split"] in moments:
          moments[s["split"]].merge(shard)
        else:
          moments[s["split"]] = shard
  os.replace(os.path.join(out, prepared.SKIPPED + ".tmp"), os.path.join(out, prepared.SKIPPED))
  content = hashlib.sha256("".join(f"{s['file']} {s['sha256']}\n" for s in summaries).encode()).hexdigest()
  tokenizer = os.path.join(out, run_dir.TOKENIZER_FILE)
  manifest = dict(kind=reader.kind, source=config.source, path=config.path, image_size=config.image_size,
                  latents=codec is not None, splits=splits, content_hash=content,
                  tokenizer_sha256=sha256_of(tokenizer) if reader.kind == "text" else None)
  if codec is not None:
    measured_split = "train" if "train" in splits else next(iter(splits))
    if measured_split not in moments:
      raise ValueError(f"no {measured_split} example of {config.path} was prepared (skipped: "
                       f"{splits[measured_split]['skipped_by_reason']}, see {prepared.SKIPPED}): nothing to measure "
                       "the latent statistics on")
    latent_cache.write_metadata(out, dict(codec.metadata, **moments[measured_split].codec_statistics(),
                                          image_size=config.image_size, measured_on=measured_split,
                                          splits={k: v["examples"] for k, v in splits.items()}))
  _write_json(os.path.join(out, prepared.MANIFEST), manifest)
  return manifest


def prepare(config, out: str) -> dict:
  """Prepare (or finish preparing) config's source into `out`; returns the manifest."""
  config_lib.validate_prepare(config)
  out = os.path.abspath(os.path.expanduser(out))
  with workdir_lock.hold(out):
    return _prepare(config, out)


def _prepare(config, out: str) -> dict:
  reader = make_reader(config)
  settings = check_settings(config, reader, out)
  if reader.kind == "text":
    distributed.chief_first("tokenizer", lambda: prepare_tokenizer(config, reader, out))
  codec = codecs.frozen_codec(config.vae) if config.vae and reader.kind != "text" else None
  if codec is not None and config.image_size % codec.downsample:
    raise config_lib.ConfigError(f"config.image_size = {config.image_size} is not a multiple of the VAE's "
                                 f"downsampling factor {codec.downsample}")
  jobs = shard_jobs(reader, config.examples_per_shard)
  mine = [j for j in jobs if j.index % jax.process_count() == jax.process_index()]
  todo = [j for j in mine if not os.path.isfile(os.path.join(out, j.file + ".json"))]
  logging.info("%d of %d shards to prepare (%d done before)", len(todo), len(mine), len(mine) - len(todo))
  progress = tqdm.tqdm(total=sum(j.stop - j.start for j in mine), initial=sum(j.stop - j.start for j in mine
                       if j not in todo), unit="example", disable=not distributed.is_chief())
  try:
    for job, records, skipped in built_shards(reader, settings, out, todo, config.workers):
      write_shard(out, job, records, skipped, codec)
      progress.update(job.stop - job.start)
      progress.set_postfix(skipped=len(skipped))
  finally:
    progress.close()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tfusion.prepare: all shards written")
  manifest = None
  if distributed.is_chief():
    manifest = write_manifest(config, reader, out, jobs, codec)
    for split, s in manifest["splits"].items():
      logging.info("%s: %d examples in %d shards (%.1f MB), %d skipped %s", split, s["examples"], len(s["shards"]),
                   s["bytes"] / 1e6, s["skipped"], s["skipped_by_reason"] or "")
  return manifest


def main(argv):
  distributed.start_command(argv, ("config", "out"))
  prepare(flags.FLAGS.config, flags.FLAGS.out)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Prepare config file (see experiments/prepare.py).",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Directory of the prepared dataset (created; a partial one is resumed).")
  distributed.define_flags()
  app.run(main)
