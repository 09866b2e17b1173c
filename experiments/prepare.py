"""Dataset preparation presets for python -m tfusion.prepare: --config experiments/prepare.py:<preset>.

  folder  an image folder with <stem>.txt captions (CC12M-style after img2dataset); --config.captions
          takes a .csv / .jsonl manifest of (file, caption) instead
  coco    TFDS coco_captions, train and val, first of the 5 captions per image
  jsonl   a .jsonl of {"text": ...} documents, a 32K sentencepiece tokenizer trained on 100K of them
  c4      TFDS c4/en text
  edits   a .jsonl of {"input", "instruction", "output"} image-editing examples

Set --config.path, and --config.vae to store VAE latents instead of pixels.
"""
from tfusion import config as config_lib

PRESETS = ("folder", "coco", "jsonl", "c4", "edits")


def get_config(preset: str = "folder"):
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}: one of {PRESETS}")
  c = config_lib.default_prepare_config()
  if preset == "folder":
    c.source = "image_folder"
  elif preset == "coco":
    c.source, c.path = "tfds", "coco_captions"
    c.tfds.splits, c.tfds.image_key, c.tfds.caption_key = "train,val", "image", "captions/text"
  elif preset == "jsonl":
    c.source = "jsonl"
  elif preset == "c4":
    c.source, c.path = "tfds", "c4/en"
    c.tfds.kind, c.tfds.splits, c.tfds.text_key = "text", "train,validation", "text"
  else:
    c.source = "edit_jsonl"
  return c
