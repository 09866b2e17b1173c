"""Small builders and checks shared by the tests (fixtures are in conftest.py)."""
import math
import os

from flax import traverse_util
import flax.linen as nn
import jax
from jax.sharding import PartitionSpec
import numpy as np
import orbax.checkpoint as ocp
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from tfusion import config as config_lib, diffusion, spec as spec_lib
from tfusion.data import pipeline, sequence
from tfusion.evaluation import clip
from tfusion.training import optim, state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = sequence.SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)


def packed_rows(layout: sequence.RowLayout, documents_per_row: list[list[list]], num_timesteps=1000) -> dict:
  """Stack rows built from lists of documents into a batch dict of numpy arrays."""
  rows = []
  for documents in documents_per_row:
    row = sequence.RowBuilder(layout, SPECIAL, num_timesteps)
    for pieces in documents:
      row.add(pieces)
    rows.append(row.arrays())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def image_doc(layout, caption=(10, 11, 12), caption_first=True, seed=0):
  latents = np.random.default_rng(seed).standard_normal(layout.latent_shape).astype(np.float32)
  return sequence.image_caption_document(list(caption), latents, caption_first, SPECIAL, 1000, 500)


def text_doc(length, start=20):
  return [sequence.TextPiece(np.arange(start, start + length, dtype=np.int32))]


def logically_partitioned_params(variables) -> list:
  """The boxed params of init variables, asserting every leaf carries one logical name per dimension and
  the partition specs mirror them."""
  assert set(variables) == {"params"}
  boxed = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert boxed and all(isinstance(v, nn.Partitioned) for v in boxed)     # no bare arrays
  specs = jax.tree.leaves(nn.get_partition_spec(variables), is_leaf=lambda v: isinstance(v, PartitionSpec))
  assert len(specs) == len(boxed)
  for spec, v in zip(specs, boxed):
    assert isinstance(spec, PartitionSpec) and len(spec) == len(v.names) == v.value.ndim
    assert all(isinstance(name, str) for name in v.names)
  return boxed


def set_fields(config, values: dict):
  """`config` with each value of {"group.field": value} set (also top-level "field"); returns it."""
  for key, value in values.items():
    *groups, last = key.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[last] = value
  return config


def raising(error: BaseException):
  """A stand-in for any function or method: it raises `error`, whatever it is called with."""
  def fail(*args, **kwargs):
    raise error
  return fail


# ---- A tiny model and train step (test_model, test_scaling, test_checkpoints, test_decoding). ----------
LATENT = (8, 8, 3)
LAYOUT = sequence.RowLayout(seq_len=64, latent_shape=LATENT, patch_size=2)   # 16 patches per image
VOCAB = 64


def tiny_model_config(**overrides):
  c = config_lib.default_config()
  c.seq_len, c.data.image_size = LAYOUT.seq_len, LATENT[0]
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim, c.model.patch_size = 2, 32, 4, 64, 2
  c.optim.lr, c.optim.warmup_steps = 3e-3, 5
  for k, v in overrides.items():
    c.model[k] = v
  return c


def tiny_batch():
  return packed_rows(LAYOUT, [
      [image_doc(LAYOUT, caption=(10, 11, 12), seed=0), text_doc(20, start=30)],
      [text_doc(5, start=40), image_doc(LAYOUT, caption=(13, 14), caption_first=False, seed=1),
       image_doc(LAYOUT, caption=(15,), seed=2)],
  ])


def make_model(config):
  return spec_lib.resolve(config).transfusion(VOCAB)


def init_state(config, mesh, total_steps=100, microbatches=1):
  model = make_model(config)
  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  init = sequence.dummy_batch(1, LAYOUT)
  state, shardings = state_lib.create_train_state(model, tx, init, jax.random.key(0), mesh)
  step = step_lib.jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule,
                                 alpha_bar=diffusion.cosine_alpha_bar(1000), loss_weight=5.0,
                                 train_key=jax.random.key(1), microbatches=microbatches)
  return model, state, step


def run_steps(mesh, state, step, batch, n):
  history = []
  for _ in range(n):
    with jax.set_mesh(mesh):
      state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


# ---- Tiny training runs on the 16 px shapes data (the data_dir fixture). --------------------------
def tiny_run_config(data_dir, **top):
  c = config_lib.default_config()
  c.total_steps, c.batch_size, c.seq_len, c.log_every, c.ckpt_every, c.sample_every = 6, 8, 64, 1, 3, 6
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim, c.model.patch_size = 2, 32, 2, 64, 4
  c.data.data_dir, c.data.image_size, c.data.vocab_size = data_dir, 16, 512
  c.optim.warmup_steps = 2
  c.sample.num_images, c.sample.num_captions, c.sample.diffusion_steps, c.sample.max_caption_tokens = 2, 2, 4, 4
  c.update(top)
  return c


TIMING = {"elements_per_sec", "tflops_per_device", "mfu"}


def saved_state(workdir, step) -> dict:
  """The train state saved at `step`, as numpy arrays (whatever devices and processes saved it)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as c:
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), c.metadata(path).item_metadata.tree)
    return c.restore(path, restore_args=as_numpy)


def assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    assert np.array_equal(x, y), jax.tree_util.keystr(path)


def without_timing(entries):
  return [{k: v for k, v in m.items() if k not in TIMING} for m in entries]


# ---- A grain row stream of synthetic sources (test_sequence, test_checkpoints). -------------------
def make_sources(text_fraction=0.5, text_lengths=(5, 30, 90)):
  rng = np.random.default_rng(1)
  texts = [np.arange(100, 100 + n, dtype=np.int32) for n in text_lengths * 10]
  images = [dict(caption=rng.integers(40, 60, size=int(rng.integers(2, 6))).tolist(), index=i) for i in range(50)]

  def prepare(example):
    return example["caption"], np.full((4, 4, 3), example["index"], np.float32)

  return [pipeline.Source("text", "text", texts, lambda ids: ids, text_fraction),
          pipeline.Source("images", "image_caption", images, prepare, 1 - text_fraction)]


def make_stream(text_fraction=0.5, caption_first_prob=0.8, seq_len=64, text_lengths=(5, 30, 90), seed=0,
                process_index=0, process_count=1, caption_dropout_prob=0.0, sources=None, workers=0,
                max_images_per_row=0):
  layout = sequence.RowLayout(seq_len, (4, 4, 3), 2, max_images_per_row)
  mix = pipeline.MixOptions(caption_first_prob, 1000, 500, seed, caption_dropout_prob)
  return pipeline.train_batches(sources or make_sources(text_fraction, text_lengths), layout, SPECIAL, mix,
                                global_rows=4, process_index=process_index, process_count=process_count,
                                workers=workers)


# ---- Random weights of the scoring networks (test_clip, test_inception; the weight-file metrics). ----
CLIP_SENTENCES = ["a photo of a cat", "a photo of a dog on the grass", "a painting of a red house by the sea",
             "two cats sleeping on a blue sofa", "an old man reading a book in the park",
             "a bowl of green apples on a wooden table", "the city at night with bright lights"]
CLIP_MAX_POSITIONS = 16


def make_clip_tokenizer() -> Tokenizer:
  """A small BPE with CLIP's specials appended after training (so <|endoftext|> is the largest id, as in CLIP) and
  a post-processor wrapping each text in them."""
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(CLIP_SENTENCES, trainers.BpeTrainer(vocab_size=90, show_progress=False))
  tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
  bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
  return tok


CLIP_TOKENIZER = make_clip_tokenizer()
CLIP_EOS = CLIP_TOKENIZER.token_to_id("<|endoftext|>")


def clip_config_dict(act="quick_gelu", eos_token_id=CLIP_EOS) -> dict:
  """Towers of different sizes (so a swapped size or weight cannot pass); extra HF keys as real configs have."""
  return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16, "logit_scale_init_value": 2.6592,
          "text_config": {"vocab_size": CLIP_TOKENIZER.get_vocab_size(), "hidden_size": 24, "intermediate_size": 40,
                          "num_hidden_layers": 2, "num_attention_heads": 3,
                          "max_position_embeddings": CLIP_MAX_POSITIONS,
                          "hidden_act": act, "layer_norm_eps": 1e-5, "eos_token_id": eos_token_id,
                          "bos_token_id": 0, "pad_token_id": 1, "projection_dim": 16},
          "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": act,
                            "layer_norm_eps": 1e-6, "num_channels": 3, "projection_dim": 16}}


def random_clip_params(config: clip.ClipConfig, seed=0):
  """ClipModel params of the init tree's shapes (checked to carry logical names), random NumPy values:
  LayerNorm scales near 1, biases ~0.1, matrices and embeddings of O(1) outputs."""
  abstract = jax.eval_shape(clip.ClipModel(config).init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                            np.zeros((1, CLIP_MAX_POSITIONS), np.int32))
  logically_partitioned_params(abstract)
  rng = np.random.default_rng(seed)
  flat = {}
  for key, leaf in traverse_util.flatten_dict(nn.meta.unbox(abstract["params"])).items():
    shape = leaf.shape
    if key[-1] == "scale":
      value = 1 + 0.2 * rng.standard_normal(shape)
    elif key[-1] == "bias":
      value = 0.1 * rng.standard_normal(shape)
    elif key[-1] == "logit_scale":
      value = np.asarray(2.6592)
    else:
      value = 0.25 * rng.standard_normal(shape)
    flat[key] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def random_inception_params(abstract_params, seed=0):
  """Random FidInception params in Flax layout: He-normal kernels, BN with non-trivial weights, biases and running
  statistics (positive variances)."""
  rng = np.random.default_rng(seed)
  draws = {"kernel": lambda s: rng.normal(0, math.sqrt(2 / math.prod(s[:3])), s), "scale": lambda s: rng.uniform(
      0.5, 1.5, s), "bias": lambda s: rng.normal(0, 0.1, s), "mean": lambda s: rng.normal(0, 0.2, s),
           "var": lambda s: rng.uniform(0.5, 2.0, s)}
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params))
  return traverse_util.unflatten_dict({k: draws[k[-1]](v.shape).astype(np.float32) for k, v in flat.items()})


def assert_safetensors_round_trip(save, load, path: str, params, tensors: dict) -> None:
  """save(path, params) writes exactly `tensors` (name -> array) as float32, bit for bit, and load(path)
  gives `params` back bit for bit."""
  import safetensors.numpy   # pylint: disable=import-outside-toplevel
  save(path, params)
  saved = safetensors.numpy.load_file(path)
  assert set(saved) == set(tensors)
  for name, value in tensors.items():
    assert saved[name].dtype == np.float32 and saved[name].shape == value.shape
    np.testing.assert_array_equal(saved[name], value)
  again = traverse_util.flatten_dict(load(path))
  for key, value in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(again[key], value)
