"""python -m tfusion.prepare: every source type, bad-record accounting, resuming, workers, latents."""
import hashlib
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from tfusion import codecs, config as config_lib, prepare as prepare_lib, run_dir
from tfusion.data import mixture, prepared, tokenizer as tokenizer_lib
from tfusion.models import vae as vae_lib
from tests.helpers import set_fields, tiny_run_config

SIZE = 16


def prepare_config(**fields):
  c = config_lib.default_prepare_config()
  c.image_size, c.min_image_size, c.examples_per_shard = SIZE, 8, 4
  return set_fields(c, fields)


def banded_image(height, width, index):
  """Green centre square (the crop) between red bands; the index is in the blue channel."""
  a = np.zeros((height, width, 3), np.uint8)
  a[..., 0] = 255
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  a[top:top + side, left:left + side] = (0, 255, index)
  return a


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """7 good images (sizes vary, one nested) and 5 bad ones, with sidecar captions."""
  root = tmp_path_factory.mktemp("folder")
  os.makedirs(root / "sub")
  good = {f"img{i}.png": banded_image(20 + 7 * i, 40 - 3 * i, 10 * i) for i in range(6)}
  good["sub/deep.jpg"] = banded_image(30, 30, 99)
  for name, array in good.items():
    Image.fromarray(array).save(root / name, quality=100)
    (root / name).with_suffix(".txt").write_text(f"caption of {name}\n")
  (root / "broken.png").write_bytes(b"not an image")
  (root / "broken.txt").write_text("a broken image")
  Image.fromarray(banded_image(6, 6, 0)).save(root / "tiny.png")
  (root / "tiny.txt").write_text("too small")
  Image.fromarray(banded_image(20, 20, 0)).save(root / "empty.png")
  (root / "empty.txt").write_text(" \n")
  Image.fromarray(banded_image(20, 20, 0)).save(root / "latin1.png")
  (root / "latin1.txt").write_bytes(b"caf\xe9")
  Image.fromarray(banded_image(20, 20, 0)).save(root / "uncaptioned.png")
  return root, good


EXPECTED_SKIPS = {"broken.png": "unreadable image", "tiny.png": "too small image", "empty.png": "empty caption",
                  "latin1.png": "non-UTF-8 caption", "uncaptioned.png": "no caption file"}


def test_image_folder_with_sidecar_captions(image_folder, tmp_path):
  root, good = image_folder
  manifest = prepare_lib.prepare(prepare_config(path=str(root)), tmp_path)
  split = manifest["splits"]["train"]
  assert manifest["kind"] == "image_caption" and not manifest["latents"]
  assert split["examples"] == 7 and split["skipped"] == 5 and len(split["shards"]) == 3      # 12 files / 4
  assert split["skipped_by_reason"] == {reason: 1 for reason in EXPECTED_SKIPS.values()}
  report = [json.loads(line) for line in open(tmp_path / prepared.SKIPPED)]
  assert {r["id"]: r["reason"].split(":")[0] for r in report} == EXPECTED_SKIPS
  source = prepared.PreparedSource(tmp_path, "train")
  records = {r["caption"].decode(): r["image"] for r in source.__getitems__(range(len(source)))}
  assert sorted(records) == sorted(f"caption of {name}" for name in good)
  for name, array in good.items():
    image = records[f"caption of {name}"]
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    tolerance = 20 if name.endswith(".jpg") else 2
    # The centre crop keeps only the green square: no red band survives.
    assert image[..., 0].max() <= tolerance and image[..., 1].min() >= 255 - tolerance
    assert abs(int(np.median(image[..., 2])) - int(array[array.shape[0] // 2, array.shape[1] // 2, 2])) <= tolerance
  for shard in split["shards"]:
    assert prepare_lib.sha256_of(tmp_path / shard["file"]) == shard["sha256"]
  assert manifest["content_hash"] == hashlib.sha256(
      "".join(f"{s['file']} {s['sha256']}\n" for s in split["shards"]).encode()).hexdigest()


@pytest.mark.parametrize("manifest_format", ["csv", "jsonl"])
def test_image_folder_with_a_caption_manifest(image_folder, tmp_path, manifest_format):
  root, good = image_folder
  rows = [("img0.png", "first, with a comma"), ("sub/deep.jpg", "deep one"), ("missing.png", "no such file")]
  path = tmp_path / f"captions.{manifest_format}"
  if manifest_format == "csv":
    path.write_text("file,caption\n" + "".join(f'{f},"{c}"\n' for f, c in rows))
  else:
    path.write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
  manifest = prepare_lib.prepare(prepare_config(path=str(root), captions=str(path)), tmp_path / "out")
  source = prepared.PreparedSource(tmp_path / "out", "train")
  assert [r["caption"].decode() for r in source.__getitems__(range(len(source)))] == ["first, with a comma", "deep one"]
  assert manifest["splits"]["train"]["skipped_by_reason"] == {"unreadable image": 1}


def test_interrupted_job_resumes_without_redoing_finished_shards(image_folder, tmp_path):
  root, _ = image_folder
  config = prepare_config(path=str(root))
  first = prepare_lib.prepare(config, tmp_path)
  shards = [tmp_path / s["file"] for s in first["splits"]["train"]["shards"]]
  mtimes = [os.stat(s).st_mtime_ns for s in shards]
  # Interrupted: the manifest and the last shard's summary were never written.
  os.remove(tmp_path / prepared.MANIFEST)
  os.remove(str(shards[2]) + ".json")
  with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
    prepared.PreparedSource(tmp_path, "train")
  again = prepare_lib.prepare(config, tmp_path)
  assert [os.stat(s).st_mtime_ns for s in shards[:2]] == mtimes[:2] and os.stat(shards[2]).st_mtime_ns != mtimes[2]
  assert again == first
  with pytest.raises(config_lib.ConfigError, match="begun with other settings"):
    prepare_lib.prepare(prepare_config(path=str(root), image_size=8), tmp_path)


def test_worker_processes_write_the_same_shards(image_folder, tmp_path):
  root, _ = image_folder
  inline = prepare_lib.prepare(prepare_config(path=str(root)), tmp_path / "inline")
  pooled = prepare_lib.prepare(prepare_config(path=str(root), workers=2), tmp_path / "pooled")
  assert pooled["content_hash"] == inline["content_hash"]


TEXT_LINES = [json.dumps({"text": "The quick brown fox jumps over the lazy dog."}).encode(),
              b"",                                             # blank line
              b"{not json",
              json.dumps({"title": "no text"}).encode(),
              json.dumps({"text": "   "}).encode(),
              b'{"text": "caf\xe9"}',                           # not UTF-8
              json.dumps({"text": "Pack my box with five dozen liquor jugs.\nSecond line."}).encode(),
              json.dumps({"text": "How vexingly quick daft zebras jump!"}).encode()]


def test_text_jsonl_is_tokenized_with_a_trained_tokenizer(tmp_path):
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_bytes(b"\n".join(TEXT_LINES) + b"\n")
  manifest = prepare_lib.prepare(prepare_config(source="jsonl", path=str(corpus), vocab_size=300,
                                                examples_per_shard=3), tmp_path / "out")
  split = manifest["splits"]["train"]
  assert manifest["kind"] == "text" and split["examples"] == 3 and len(split["shards"]) == 3
  assert split["skipped_by_reason"] == {"blank line": 1, "invalid JSON line": 2, 'no "text" field': 1,
                                        "empty text": 1}
  report = [json.loads(line) for line in open(tmp_path / "out" / prepared.SKIPPED)]
  assert [r["id"] for r in report] == ["corpus.jsonl:2", "corpus.jsonl:3", "corpus.jsonl:4", "corpus.jsonl:5",
                                       "corpus.jsonl:6"]
  tok = tokenizer_lib.Tokenizer.load(str(tmp_path / "out" / run_dir.TOKENIZER_FILE))
  assert tok.requested_vocab_size == 300
  assert manifest["tokenizer_sha256"] == prepare_lib.sha256_of(tmp_path / "out" / run_dir.TOKENIZER_FILE)
  source = prepared.PreparedSource(tmp_path / "out", "train")
  texts = [tok.decode(source[i]["ids"]) for i in range(len(source))]
  assert texts == ["The quick brown fox jumps over the lazy dog.",
                   "Pack my box with five dozen liquor jugs.\nSecond line.",
                   "How vexingly quick daft zebras jump!"]
  # An existing tokenizer is used as it is.
  again = prepare_lib.prepare(prepare_config(source="jsonl", path=str(corpus), examples_per_shard=3,
                                             tokenizer=str(tmp_path / "out" / run_dir.TOKENIZER_FILE)), tmp_path / "given")
  assert again["tokenizer_sha256"] == manifest["tokenizer_sha256"] and again["content_hash"] == manifest["content_hash"]


def test_tokenizer_trains_on_the_first_tokenizer_sample_documents(tmp_path, monkeypatch):
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_bytes(b"\n".join(TEXT_LINES) + b"\n")
  seen, train = [], tokenizer_lib.train_tokenizer

  def spy(texts, vocab_size):
    texts = list(texts)
    seen.extend(texts)
    return train(texts, vocab_size)

  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", spy)
  prepare_lib.prepare(prepare_config(source="jsonl", path=str(corpus), vocab_size=300, examples_per_shard=3,
                                     tokenizer_sample=7), tmp_path / "out")
  assert seen == ["The quick brown fox jumps over the lazy dog.",
                  "Pack my box with five dozen liquor jugs.\nSecond line."]   # line 8 is past the sample


def test_edit_jsonl(image_folder, tmp_path):
  root, _ = image_folder
  lines = [{"input": str(root / "img0.png"), "instruction": "make it blue", "output": str(root / "img1.png")},
           {"input": str(root / "broken.png"), "instruction": "fix", "output": str(root / "img1.png")},
           {"input": str(root / "img2.png"), "output": str(root / "img3.png")}]
  path = tmp_path / "edits.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  manifest = prepare_lib.prepare(prepare_config(source="edit_jsonl", path=str(path)), tmp_path / "out")
  assert manifest["kind"] == "edit" and manifest["splits"]["train"]["examples"] == 1
  assert manifest["splits"]["train"]["skipped_by_reason"] == {"unreadable image": 1, "missing fields": 1}
  record = prepared.PreparedSource(tmp_path / "out", "train")[0]
  assert record["instruction"] == b"make it blue"
  assert record["input_image"].shape == record["output_image"].shape == (SIZE, SIZE, 3)
  assert abs(int(np.median(record["output_image"][..., 2])) - 10) <= 2


def test_tfds_image_and_text_datasets_by_name(tmp_path):
  """Real TFDS names under mock_data (random examples, no download). coco_captions and c4 need TensorFlow for
  their builder code, so image-text is caltech_birds2011 with its label name as caption, and text is lm1b."""
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    images = prepare_lib.prepare(prepare_config(source="tfds", path="caltech_birds2011", **{
        "tfds.splits": "train,test", "tfds.caption_key": "label_name", "min_image_size": 1}), tmp_path / "birds")
    text = prepare_lib.prepare(prepare_config(source="tfds", path="lm1b", vocab_size=400, **{
        "tfds.kind": "text", "tfds.splits": "train"}), tmp_path / "lm1b")
  assert sorted(images["splits"]) == ["test", "train"]
  assert images["splits"]["train"]["examples"] + images["splits"]["train"]["skipped"] == 6
  record = prepared.PreparedSource(tmp_path / "birds", "train")[0]
  assert record["image"].shape == (SIZE, SIZE, 3) and record["caption"]
  assert text["kind"] == "text" and text["splits"]["train"]["examples"] + text["splits"]["train"]["skipped"] == 6


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  """A random f = 2, 4-channel VAE in the diffusers layout."""
  path = tmp_path_factory.mktemp("vae")
  vae = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
  params = vae_lib.AutoencoderKL(vae).init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
  vae_lib.save_diffusers(str(path), vae, jax.tree.map(np.asarray, params))
  return path


def test_latents_are_the_vae_encoding_with_train_statistics(image_folder, tiny_vae, tmp_path):
  root, _ = image_folder
  pixels = prepare_lib.prepare(prepare_config(path=str(root)), tmp_path / "pixels")
  latents = prepare_lib.prepare(prepare_config(path=str(root), vae=str(tiny_vae)), tmp_path / "latents")
  assert latents["latents"] and latents["splits"]["train"]["examples"] == pixels["splits"]["train"]["examples"]
  images = prepared.PreparedSource(tmp_path / "pixels", "train")
  encoded = prepared.PreparedSource(tmp_path / "latents", "train")
  codec = codecs.vae_codec(str(tiny_vae))
  raw = codec.raw_latents(np.stack([images[i]["image"] for i in range(len(images))]))
  got = np.stack([encoded[i]["latents"] for i in range(len(encoded))])
  assert got.shape == (7, SIZE // 2, SIZE // 2, 4)
  np.testing.assert_allclose(got, raw, atol=1e-5)
  metadata = codecs.read_codec_metadata(str(tmp_path / "latents"))
  np.testing.assert_allclose(metadata["shift"], raw.reshape(-1, 4).mean(0), atol=1e-5)
  np.testing.assert_allclose(metadata["scale"], raw.reshape(-1, 4).std(0), rtol=1e-4)
  normalized = (raw.reshape(-1, 4) - raw.reshape(-1, 4).mean(0)) / raw.reshape(-1, 4).std(0)
  assert metadata["value_range"] == pytest.approx(np.abs(normalized).max(), rel=1e-4)


def test_bad_settings_name_the_field(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.path"):
    prepare_lib.prepare(prepare_config(), tmp_path)
  with pytest.raises(config_lib.ConfigError, match="config.source = 'csv'"):
    prepare_lib.prepare(prepare_config(source="csv", path="x"), tmp_path)
  with pytest.raises(FileNotFoundError, match="image folder not found: /nonexistent"):
    prepare_lib.prepare(prepare_config(path="/nonexistent"), tmp_path / "out")


# ---- Training on a mixture of prepared datasets. ------------------------------------------------
@pytest.fixture(scope="module")
def prepared_mixture(tmp_path_factory):
  """A prepared image folder, text corpus and editing set (16 px pixels), 16 or more examples each."""
  out = tmp_path_factory.mktemp("prepared")
  root = out / "folder"
  os.makedirs(root)
  for i in range(16):
    Image.fromarray(banded_image(20, 24, 15 * i)).save(root / f"img{i}.png")
    (root / f"img{i}.txt").write_text(f"a picture with blue {i}")
  corpus = out / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"Document {i}: the {i % 5} quick foxes jump {i} times."}) + "\n"
                            for i in range(40)))
  edits = out / "edits.jsonl"
  edits.write_text("".join(json.dumps({"input": f"folder/img{i}.png", "instruction": f"turn it {i}",
                                       "output": f"folder/img{i + 1}.png"}) + "\n" for i in range(5)) * 4)
  prepare_lib.prepare(prepare_config(path=str(root)), out / "images")
  prepare_lib.prepare(prepare_config(source="jsonl", path=str(corpus), vocab_size=320), out / "text")
  prepare_lib.prepare(prepare_config(source="edit_jsonl", path=str(edits)), out / "edits")
  return out


def mixture_config(out, weights=(0.5, 0.3, 0.2)):
  c = tiny_run_config(str(out / "unused_tfds"), total_steps=3, batch_size=8, seq_len=128, ckpt_every=3, sample_every=3)
  c.data.sample_split = "train"
  for name, weight in zip(("text", "images", "edits"), weights):
    c.data.mixture[name] = ml_collections.ConfigDict(dict(path=str(out / name), weight=weight, split="train"))
  return c


def test_training_on_a_prepared_mixture(prepared_mixture, tmp_path):
  from tfusion.training import trainer   # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  config = mixture_config(prepared_mixture)
  config.data.workers = 2          # the sources, tokenizer and codec travel to grain worker processes
  trainer.train_and_evaluate(config, str(workdir))
  metrics = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["images"] > 0 for m in metrics)
  assert (workdir / "tokenizer.model").read_bytes() == (prepared_mixture / "text" / run_dir.TOKENIZER_FILE).read_bytes()
  assert (workdir / "samples" / "step_3" / "images.png").is_file()
  assert not os.path.exists(prepared_mixture / "unused_tfds" / "tfusion_shapes")   # the embedded data is not built
  # Evaluation's held-out images: the sample split of the image source.
  samples = mixture.sample_examples(config, codecs.IdentityCodec())
  assert sorted(e["caption"] for e in samples.__getitems__(list(range(len(samples))))) == sorted(
      f"a picture with blue {i}".encode() for i in range(16))


def test_mixture_mismatches_name_the_source(prepared_mixture, tmp_path):
  from tfusion.training import trainer   # pylint: disable=import-outside-toplevel
  config = mixture_config(prepared_mixture)
  config.data.image_size = 32
  config.model.patch_size = 8
  with pytest.raises(config_lib.ConfigError, match="config.data.mixture.edits: .* holds 16 px images"):
    trainer.train_and_evaluate(config, str(tmp_path / "size"))
  config = mixture_config(prepared_mixture, weights=(0.0, 0.0, 0.0))
  with pytest.raises(config_lib.ConfigError, match="every weight is 0"):
    trainer.train_and_evaluate(config, str(tmp_path / "weights"))
  config = mixture_config(prepared_mixture)
  config.data.mixture.text.path = str(prepared_mixture / "nowhere")
  with pytest.raises(config_lib.ConfigError, match="config.data.mixture.text.path: .*nowhere is not a prepared"):
    trainer.train_and_evaluate(config, str(tmp_path / "missing"))


def test_two_processes_prepare_disjoint_shards_that_cover_the_source(image_folder, tmp_path, monkeypatch):
  """Process p of 2 writes shards p, p + 2, ...; process 0 writes the manifest once every shard is there.
  The processes run one after the other here, each told its index (the barrier between them is a no-op)."""
  root, _ = image_folder
  config = prepare_config(path=str(root), examples_per_shard=2)
  single = prepare_lib.prepare(config, tmp_path / "one")
  monkeypatch.setattr(prepare_lib.multihost_utils, "sync_global_devices", lambda name: None)
  monkeypatch.setattr(prepare_lib.multihost_utils, "broadcast_one_to_all", np.asarray)   # the lock's outcome
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  written = {}
  for process in (1, 0):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    before = set(os.listdir(tmp_path / "two")) if os.path.isdir(tmp_path / "two") else set()
    result = prepare_lib.prepare(config, tmp_path / "two")
    written[process] = sorted(f for f in set(os.listdir(tmp_path / "two")) - before if f.endswith(".array_record"))
    assert (result is None) == (process == 1)          # only process 0 writes the manifest
  assert written[1] == [f"train-{i:05d}-of-00006.array_record" for i in (1, 3, 5)]
  assert written[0] == [f"train-{i:05d}-of-00006.array_record" for i in (0, 2, 4)]
  assert result == single


def test_command_line(tmp_path):
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_bytes(b"\n".join(TEXT_LINES) + b"\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "-m", "tfusion.prepare", "--config", os.path.join(repo, "experiments", "prepare.py:jsonl"),
             f"--config.path={corpus}", "--config.vocab_size=300", "--config.workers=2"]
  done = subprocess.run(command + [f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "train: 3 examples in 1 shards" in done.stderr
  assert json.load(open(tmp_path / "out" / prepared.MANIFEST))["splits"]["train"]["skipped"] == 5
  missing = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "--config and --out are required" in missing.stderr


def test_mixture_of_text_sources_with_different_tokenizers_is_refused(prepared_mixture, tmp_path):
  from tfusion.training import trainer   # pylint: disable=import-outside-toplevel
  corpus = tmp_path / "other.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"Another corpus, line {i}: zebras and yaks."}) + "\n"
                            for i in range(20)))
  prepare_lib.prepare(prepare_config(source="jsonl", path=str(corpus), vocab_size=300), tmp_path / "other")
  config = mixture_config(prepared_mixture)
  config.data.mixture["other"] = ml_collections.ConfigDict(dict(path=str(tmp_path / "other"), weight=0.1,
                                                                split="train"))
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.mixture\.text was tokenized with .*, but "
                                                   r"config\.data\.mixture\.other uses .*: a run has one tokenizer"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def saved_params(workdir, step):
  import orbax.checkpoint as ocp   # pylint: disable=import-outside-toplevel
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.map(np.asarray, state["params"])


def test_fine_tuning_on_editing_data_starts_from_a_pretrained_run(prepared_mixture, tmp_path):
  from tfusion.training import trainer   # pylint: disable=import-outside-toplevel
  pretrained = str(tmp_path / "pretrained")
  trainer.train_and_evaluate(mixture_config(prepared_mixture), pretrained)
  config = mixture_config(prepared_mixture)
  config.data.mixture = ml_collections.ConfigDict({"edits": config.data.mixture.edits})
  config.data.mixture.edits.weight = 1.0
  config.data.sample_split = "none"
  resumed = dataclasses_copy(config, total_steps=6)
  resumed.data.tokenizer = os.path.join(pretrained, "tokenizer.model")
  recorded = open(os.path.join(pretrained, "config.json")).read()
  with pytest.raises(config_lib.ConfigError, match=r"may not change config.data.mixture.edits.weight from 0.2 to 1"):
    trainer.train_and_evaluate(resumed, pretrained)
  # Forced past the config check, the saved data position still refuses the other mixture; the run that
  # was refused records nothing.
  with pytest.raises(ValueError, match=r"saved for the sources \['edits \(edit, 20 examples\)', 'images .*, this run "
                                       r"has \['edits \(edit, 20 examples\)'\]: a changed mixture needs a new"):
    trainer.train_and_evaluate(resumed, pretrained, allow_config_change=["data"])
  assert open(os.path.join(pretrained, "config.json")).read() == recorded
  assert not os.path.exists(os.path.join(pretrained, "config_changes.jsonl"))
  config.init_from, config.total_steps, config.optim.lr = pretrained, 1, 1e-12   # one step that barely moves
  tuned = str(tmp_path / "tuned")
  trainer.train_and_evaluate(config, tuned)
  assert open(os.path.join(tuned, "tokenizer.model"), "rb").read() == open(os.path.join(pretrained, "tokenizer.model"),
                                                                           "rb").read()
  start, after = saved_params(pretrained, 3), saved_params(tuned, 1)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(after)):
    np.testing.assert_allclose(b, a, atol=1e-6)
  scratch = str(tmp_path / "scratch")
  config.init_from, config.data.tokenizer = "", os.path.join(pretrained, "tokenizer.model")
  trainer.train_and_evaluate(config, scratch)
  # The same seed without init_from: the 3 pretraining steps moved the params ~6e-4, far beyond the 1e-6 above.
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(start),
                                                        jax.tree.leaves(saved_params(scratch, 1)))) > 1e-4


def dataclasses_copy(config, **top):
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.update(top)
  return copy


def test_training_on_two_latent_datasets_of_one_vae(prepared_mixture, tiny_vae, tmp_path):
  """Each prepared latent set has its own statistics; the run normalises all of them with those of the first
  latent source in name order (the ConfigDict sorts names): "edits" here."""
  from tfusion.training import trainer   # pylint: disable=import-outside-toplevel
  folder = prepared_mixture / "folder"
  for name, indices in (("a", range(8)), ("b", range(8, 16))):
    os.makedirs(tmp_path / name)
    for path in (folder / f"img{i}.png" for i in indices):
      os.link(path, tmp_path / name / path.name)
      os.link(path.with_suffix(".txt"), tmp_path / name / path.with_suffix(".txt").name)
    prepare_lib.prepare(prepare_config(path=str(tmp_path / name), vae=str(tiny_vae)), tmp_path / f"{name}_latents")
  config = mixture_config(prepared_mixture, weights=(0.5, 0.0, 0.0))
  config.data.codec, config.data.latent_channels, config.data.latent_downsample = "vae", 4, 2
  config.model.patch_size = 2
  config.data.mixture.images.path = str(tmp_path / "a_latents")
  config.data.mixture.images.weight = 0.25
  config.data.mixture.edits = ml_collections.ConfigDict(dict(path=str(tmp_path / "b_latents"), weight=0.25,
                                                             split="train"))
  config.data.workers = 2
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))
  recorded = codecs.read_codec_metadata(str(workdir))
  assert recorded == codecs.read_codec_metadata(str(tmp_path / "b_latents"))
  assert recorded["shift"] != codecs.read_codec_metadata(str(tmp_path / "a_latents"))["shift"]
  assert [json.loads(line)["images"] > 0 for line in open(workdir / "metrics.jsonl")] == [True] * 3
  assert (workdir / "samples" / "step_3" / "captioned.png").is_file()
  # The export carries the VAE: moved elsewhere, it still decodes and captions exactly like the run.
  import tfusion   # pylint: disable=import-outside-toplevel
  from tfusion import export   # pylint: disable=import-outside-toplevel
  from tfusion.inference import decoding, sampler as sampler_lib   # pylint: disable=import-outside-toplevel
  out = export.export(str(workdir), str(tmp_path / "export"))
  os.rename(out, tmp_path / "moved")
  assert sorted(os.listdir(tmp_path / "moved" / "vae")) == ["config.json", "diffusion_pytorch_model.safetensors"]
  run, exported = sampler_lib.load(str(workdir)), tfusion.load(str(tmp_path / "moved"))
  options, key = decoding.SamplingOptions(diffusion_steps=2, max_new_tokens=4), jax.random.key(0)
  images = np.stack([banded_image(16, 16, 30 * i) for i in range(2)])
  assert exported.caption(images, options, key) == run.caption(images, options, key)
  np.testing.assert_array_equal(exported.text_to_image(["a picture"], options, key),
                                run.text_to_image(["a picture"], options, key))


def test_malformed_inputs_are_skipped_and_reported(tmp_path, monkeypatch):
  """Lone surrogates, decompression bombs, bad manifest rows, non-path fields: skipped, never fatal."""
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"text": "fine text"}\n{"text": "bad \\ud83d half emoji"}\n' + "[" * 100_000 + "\n")
  text = prepare_lib.prepare(prepare_config(source="jsonl", path=str(corpus), vocab_size=270), tmp_path / "text")
  assert text["splits"]["train"]["skipped_by_reason"] == {"non-UTF-8 text": 1, "invalid JSON line": 1}

  folder = tmp_path / "folder"
  os.makedirs(folder)
  Image.fromarray(banded_image(20, 20, 7)).save(folder / "ok.png")
  Image.fromarray(banded_image(40, 40, 7)).save(folder / "big.png")
  manifest = folder / "captions.csv"
  manifest.write_text("\ufefffile,caption\nok.png,a fine one\nbig.png,too many pixels\n", encoding="utf-8")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)      # 40 x 40 is over twice this: a "bomb"
  images = prepare_lib.prepare(prepare_config(path=str(folder), captions=str(manifest)), tmp_path / "images")
  assert images["splits"]["train"]["examples"] == 1
  assert images["splits"]["train"]["skipped_by_reason"] == {"too large image": 1}
  rows = folder / "captions.jsonl"
  rows.write_text('{"file": "ok.png", "caption": "\\ufeffa fine one"}\n{"file": null, "caption": "x"}\n{"file": \n')
  images = prepare_lib.prepare(prepare_config(path=str(folder), captions=str(rows)), tmp_path / "rows")
  assert images["splits"]["train"]["skipped_by_reason"] == {"missing fields": 1, "invalid JSON line": 1}
  assert [json.loads(line)["id"] for line in open(tmp_path / "rows" / prepared.SKIPPED)] == [
      "captions.jsonl:2", "captions.jsonl:3"]
  assert prepared.PreparedSource(tmp_path / "rows", "train")[0]["caption"] == b"a fine one"

  edits = tmp_path / "edits.jsonl"
  edits.write_text(json.dumps({"input": ["ok.png"], "instruction": "x", "output": "ok.png"}) + "\n"
                   + json.dumps({"input": "folder/ok.png", "instruction": "x", "output": "folder/ok.png"}) + "\n")
  edit = prepare_lib.prepare(prepare_config(source="edit_jsonl", path=str(edits)), tmp_path / "edits")
  assert edit["splits"]["train"]["skipped_by_reason"] == {"missing fields": 1}
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty.jsonl is empty"):
    prepare_lib.prepare(prepare_config(source="jsonl", path=str(empty)), tmp_path / "empty")


def test_images_are_read_as_displayed(tmp_path):
  from tfusion.data import images as images_lib   # pylint: disable=import-outside-toplevel
  transparent = np.zeros((20, 20, 4), np.uint8)
  transparent[5:15, 5:15] = (255, 0, 0, 255)                 # an opaque red square on a clear background
  rgb = images_lib.to_rgb(Image.fromarray(transparent))
  assert np.asarray(rgb)[0, 0].tolist() == [255, 255, 255] and np.asarray(rgb)[10, 10].tolist() == [255, 0, 0]
  deep = Image.fromarray(np.full((20, 20), 32768, np.uint16))   # 16-bit grey at half intensity
  assert np.asarray(images_lib.to_rgb(deep))[0, 0].tolist() == [128, 128, 128]
  upright = np.zeros((20, 30, 3), np.uint8)
  upright[:, :15] = (0, 0, 255)                              # blue left half
  sideways = Image.fromarray(np.rot90(upright).copy())       # stored turned left; EXIF 6: turn right to show
  exif = sideways.getexif()
  exif[0x0112] = 6
  sideways.save(tmp_path / "photo.jpg", exif=exif, quality=95)
  shown = np.asarray(images_lib.to_rgb(Image.open(tmp_path / "photo.jpg")))
  assert shown.shape == (20, 30, 3) and shown[10, 2, 2] > 200 and shown[10, 27, 2] < 50


def test_resume_refuses_a_changed_source(tmp_path):
  folder = tmp_path / "folder"
  os.makedirs(folder)
  for name in ("b", "d", "f"):
    Image.fromarray(banded_image(20, 20, 7)).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(name)
  config = prepare_config(path=str(folder), examples_per_shard=2)
  prepare_lib.prepare(config, tmp_path / "out")
  os.remove(tmp_path / "out" / (prepared.shard_file("train", 1, 2) + ".json"))    # interrupted
  Image.fromarray(banded_image(20, 20, 7)).save(folder / "a.png")                 # and the folder grew
  (folder / "a.txt").write_text("a")
  with pytest.raises(config_lib.ConfigError, match="another state of the source"):
    prepare_lib.prepare(config, tmp_path / "out")


def test_latents_of_a_split_with_no_good_record_name_the_skips(image_folder, tiny_vae, tmp_path):
  root, _ = image_folder
  with pytest.raises(ValueError, match=r"no train example .* prepared \(skipped: .*'too small image': 8.*see skipped"):
    prepare_lib.prepare(prepare_config(path=str(root), vae=str(tiny_vae), min_image_size=1000), tmp_path / "out")
