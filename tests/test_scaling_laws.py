"""Scaling trendlines and the parity FLOP ratio (evaluation/scaling_laws.py) on numbers with known answers, and
an ablation with `methods` collecting them."""
import json
import math
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from tfusion import config as config_lib
from tfusion.evaluation import scaling_laws as sl
from tests.helpers import tiny_run_config


def test_fit_recovers_a_power_law_and_inverts_it():
  flops = np.array([1e15, 1e16, 1e17, 1e18])
  law = sl.fit_power_law(flops, 3 * flops ** -0.2)
  assert law.slope == pytest.approx(-0.2, rel=1e-12) and law.intercept == pytest.approx(math.log(3), rel=1e-12)
  assert law.flops_range == (1e15, 1e18)
  assert law.predict(1e16) == pytest.approx(3 * 10 ** -3.2, rel=1e-12)                 # 0.0018929
  assert law.flops_for(3 * 10 ** -3.3) == pytest.approx(10 ** 16.5, rel=1e-12)
  assert law.flops_for(law.predict(4.2e17)) == pytest.approx(4.2e17, rel=1e-12)
  # Off the line, least squares: log FLOPs 0, 1, 2 with log values 0, 1, 1: slope = sum dx dy / sum dx^2 =
  # (-1 * -2/3 + 0 + 1 * 1/3) / 2 = 0.5, intercept = 2/3 - 0.5 * 1 = 1/6.
  law = sl.fit_power_law(np.exp([0.0, 1.0, 2.0]), np.exp([0.0, 1.0, 1.0]))
  assert law.slope == pytest.approx(0.5, rel=1e-12) and law.intercept == pytest.approx(1 / 6, rel=1e-12)


def test_fit_needs_two_flop_counts_and_positive_values():
  with pytest.raises(ValueError, match="text_perplexity of chameleon: .*2 or more distinct FLOP counts"):
    sl.fit_power_law([1e15, 1e15], [3.0, 2.0], "text_perplexity of chameleon")
  with pytest.raises(ValueError, match="caption_cider of transfusion: .*values and FLOPs > 0"):
    sl.fit_power_law([1e15, 1e16], [0.0, 2.0], "caption_cider of transfusion")
  with pytest.raises(ValueError, match="values and FLOPs > 0"):
    sl.fit_power_law([1e15, 1e16], [float("nan"), 2.0])


def test_parity_ratio_against_hand_computations():
  # Lower is better: the candidate's perplexity 100 * F^-0.1 (runs from 1e9 to 1e11 FLOPs) reaches the
  # reference's 10 at F = (100 / 10)^10 = 1e10: ratio 1e10 / 2e10 = 0.5, inside the runs.
  perplexity = sl.PowerLaw(-0.1, math.log(100), (1e9, 1e11))
  parity = sl.parity_ratio(perplexity, 10.0, 2e10, higher_is_better=False)
  assert parity.ratio == pytest.approx(0.5, rel=1e-12) and parity.flops == pytest.approx(1e10, rel=1e-12)
  assert parity.extrapolated is False and parity.reason is None
  # It reaches 5 at (100 / 5)^10 = 20^10 = 1.024e13, beyond its runs: ratio 1.024e13 / 2e10 = 512.
  parity = sl.parity_ratio(perplexity, 5.0, 2e10, higher_is_better=False)
  assert parity.ratio == pytest.approx(512, rel=1e-12) and parity.extrapolated is True
  # Higher is better: accuracy 1e-3 * F^0.2 reaches 0.5 at (0.5 / 1e-3)^5 = 500^5 = 3.125e13; the reference's
  # largest run has 1e15 FLOPs: ratio 0.03125.
  accuracy = sl.PowerLaw(0.2, math.log(1e-3), (1e10, 1e15))
  parity = sl.parity_ratio(accuracy, 0.5, 1e15, higher_is_better=True)
  assert parity.ratio == pytest.approx(0.03125, rel=1e-12) and parity.extrapolated is False
  # A trendline that worsens with compute, or is flat, never gets there.
  parity = sl.parity_ratio(perplexity, 0.5, 1e15, higher_is_better=True)
  assert parity.ratio is None and parity.flops is None and "gets worse with compute (slope -0.1" in parity.reason
  parity = sl.parity_ratio(sl.PowerLaw(1e-4, 0.0, (1e9, 1e11)), 0.5, 1e15, higher_is_better=True)
  assert parity.ratio is None and "flat (slope 0.0001)" in parity.reason


def number(mean, std=0.0):
  return dict(mean=mean, std=std, values=[mean])


def scaling_table():
  """collect()'s table for chameleon (ch_*) and transfusion (tf_*) at 1e15, 1e16, 1e17 FLOPs; ch_xl unfinished,
  `other` in no method. Transfusion: perplexity 100 * F^-0.1, CIDEr 1e-3 * F^0.2, no exact match at tf_s."""
  table = {}
  for size, flops in (("s", 1e15), ("m", 1e16), ("l", 1e17)):
    table[f"tf_{size}"] = {"numbers": {
        "flops_6nd": number(flops), "params": number(1e6), "eval/text/perplexity": number(100 * flops ** -0.1, 0.05),
        "eval/image_to_text/cider": number(1e-3 * flops ** 0.2), "eval/text_to_image/shapes_all": number(0.1)}}
    if size != "s":
      table[f"tf_{size}"]["numbers"]["eval/image_to_text/shapes_exact"] = number(0.2)
  for size, flops, perplexity, cider, exact, t2i in (("s", 1e15, 4.0, 0.1, 0.1, 0.05), ("m", 1e16, 3.0, 0.2, 0.2, 0.1),
                                                    ("l", 1e17, 100 * 1e16 ** -0.1, 0.25, 0.3, 0.0)):
    table[f"ch_{size}"] = {"numbers": {
        "flops_6nd": number(flops), "params": number(1e6), "eval/text/perplexity": number(perplexity, 0.02),
        "eval/image_to_text/cider": number(cider), "eval/image_to_text/shapes_exact": number(exact),
        "eval/text_to_image/shapes_all": number(t2i)}}
  table["ch_xl"] = {"numbers": {}}
  table["other"] = {"numbers": {"flops_6nd": number(1e20)}}
  return table


METHODS = {"ch_s": "chameleon", "ch_m": "chameleon", "ch_l": "chameleon", "ch_xl": "chameleon",
           "tf_s": "transfusion", "tf_m": "transfusion", "tf_l": "transfusion"}


def test_scaling_report_table3_and_plot(tmp_path):
  report = sl.scaling_report(scaling_table(), METHODS)
  assert report["methods"] == {"chameleon": ["ch_s", "ch_m", "ch_l"], "transfusion": ["tf_s", "tf_m", "tf_l"]}
  assert report["unfinished"] == ["ch_xl"]
  assert report["largest_runs"] == {"chameleon": dict(variant="ch_l", flops=1e17),
                                    "transfusion": dict(variant="tf_l", flops=1e17)}
  metrics = report["metrics"]
  # Perplexity: chameleon's largest run has transfusion's value at 1e16 (100 * 1e16^-0.1 = 2.512): ratio 0.1.
  perplexity = metrics["text_perplexity"]
  assert perplexity["methods"]["transfusion"]["fit"]["slope"] == pytest.approx(-0.1, rel=1e-12)
  assert [p["value"] for p in perplexity["methods"]["chameleon"]["points"]] == [4.0, 3.0, 100 * 1e16 ** -0.1]
  assert perplexity["parity"]["ratio"] == pytest.approx(0.1, rel=1e-12) and not perplexity["parity"]["extrapolated"]
  # CIDEr: chameleon's 0.25 is transfusion's at (0.25 / 1e-3)^5 = 9.765625e11, below its runs: ratio 9.765625e-6.
  cider = metrics["caption_cider"]["parity"]
  assert cider["ratio"] == pytest.approx(9.765625e-6, rel=1e-12) and cider["extrapolated"] is True
  # No fit where a run lacks the number; no ratio where the reference's largest run has 0.
  exact = metrics["caption_exact_match"]
  assert exact["methods"]["transfusion"]["skipped"] == "no value > 0 at tf_s (missing)"
  assert exact["parity"]["ratio"] is None and exact["parity"]["reason"] == "transfusion: no value > 0 at tf_s (missing)"
  t2i = metrics["t2i_checker_all"]
  assert t2i["methods"]["chameleon"]["skipped"] == "no value > 0 at ch_l (0.0)"
  assert t2i["parity"]["reason"] == "chameleon: no value > 0 at its largest run"
  assert t2i["methods"]["transfusion"]["fit"]["slope"] == pytest.approx(0.0, abs=1e-12)     # 0.1 everywhere
  assert metrics["clip_score"]["parity"]["reason"].startswith("transfusion: no value > 0 at tf_s (missing)")
  json.dumps(report)

  markdown = sl.table3_markdown(report)
  assert ("| metric | chameleon (ch_l, 1e+17 FLOPs) | transfusion (tf_l, 1e+17 FLOPs) | parity FLOP ratio | "
          "candidate trendline |") in markdown
  assert "| Text perplexity ↓ | 2.512 ± 0.02 | 1.995 ± 0.05 | 0.1 | interpolated at 1e+16 FLOPs |" in markdown
  assert ("| Captioning CIDEr ↑ | 0.25 ± 0 | 2.512 ± 0 | 9.77e-06 | extrapolated to 9.77e+11 FLOPs (runs 1e+15 to "
          "1e+17) |") in markdown
  assert ("| Text-to-image checker, all ↑ | 0 ± 0 | 0.1 ± 0 | — | chameleon: no value > 0 at its largest run |"
          in markdown)
  assert "FLOPs are 6ND" in markdown and "Unfinished variants, not counted: ch_xl." in markdown
  assert len(markdown.splitlines()) == 2 + len(sl.METRICS) + 3

  path = str(tmp_path / "scaling.png")
  sl.plot(report, path)
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == (1350, 720)    # 4 panels with points: 3 x 2 of 4.5 x 3.6 in
    assert len(set(np.asarray(image.convert("L")).ravel().tolist())) > 10   # something is drawn


def test_scaling_report_names_bad_methods():
  with pytest.raises(ValueError, match=r"methods: \['tf_xxl'\] are not variants"):
    sl.scaling_report(scaling_table(), {**METHODS, "tf_xxl": "transfusion"})
  with pytest.raises(ValueError, match="no variant of the reference method 'chameleon'"):
    sl.scaling_report(scaling_table(), {"tf_s": "transfusion", "tf_m": "transfusion"})


def test_ablation_with_methods_collects_the_scaling_report(tmp_path, monkeypatch):
  """Finished cells fabricated as collect() reads them (eval report, metrics log; the parameter count is
  patched): N = 1000 d_model, D = steps * 8 * 64. 6ND: s 6 * 32e3 * 10 * 512 = 9.8304e8, l 4x that. Transfusion's
  perplexity 100 * F^-0.1 passes chameleon's largest value, its own at 2 F_s, at 2 F_s: ratio 2 F_s / 4 F_s = 0.5."""
  from tfusion import ablate   # pylint: disable=import-outside-toplevel
  ablation = ml_collections.ConfigDict()
  ablation.base = tiny_run_config(str(tmp_path / "tfds"))
  small, large = {"model": {"d_model": 32}, "total_steps": 10}, {"model": {"d_model": 64}, "total_steps": 20}
  ablation.variants = ml_collections.ConfigDict({"ch_s": small, "ch_l": large, "tf_s": small, "tf_l": large})
  ablation.seeds = (0,)
  ablation.methods = ml_collections.ConfigDict({"ch_s": "chameleon", "ch_l": "chameleon", "tf_s": "transfusion",
                                                "tf_l": "transfusion"})
  monkeypatch.setattr(ablate, "_param_count", lambda config, directory: 1000 * config.model.d_model)
  f_small = 6 * 32e3 * 10 * 512
  perplexity = {"ch_s": 9.0, "ch_l": 100 * (2 * f_small) ** -0.1,
                "tf_s": 100 * f_small ** -0.1, "tf_l": 100 * (4 * f_small) ** -0.1}
  workdir = str(tmp_path / "ablation")
  for variant, value in perplexity.items():
    steps = ablation.variants[variant].total_steps
    directory = ablate.cell_dir(workdir, variant, 0)
    os.makedirs(os.path.join(directory, "eval"))
    with open(os.path.join(directory, "eval", f"step_{steps}.json"), "w") as f:
      json.dump({"step": steps, "text": {"perplexity": value}, "image_to_text": {"cider": 0.5}}, f)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": steps, "loss": 1.0, "text_loss": 0.5, "image_loss": 0.5}) + "\n")
  table = ablate.collect(ablation, workdir)
  assert table["ch_l"]["numbers"]["flops_6nd"]["mean"] == pytest.approx(4 * f_small, rel=1e-12)
  assert not any("paired" in t for t in table.values())     # a scaling study's variants are no paired arms
  with open(f"{workdir}/scaling.json") as f:
    report = json.load(f)
  assert report["metrics"]["text_perplexity"]["parity"]["ratio"] == pytest.approx(0.5, rel=1e-9)
  assert report["metrics"]["caption_cider"]["parity"]["reason"].startswith("the candidate's trendline is flat")
  assert "| Text perplexity ↓ | " in open(f"{workdir}/table3.md").read()
  assert os.path.getsize(f"{workdir}/scaling.png") > 0
  # A methods entry of an unknown variant, or no variant of a method, is a ConfigError naming the field.
  ablation.methods.tf_xl = "transfusion"
  with pytest.raises(config_lib.ConfigError, match=r"config.methods.tf_xl: not a variant"):
    ablate.collect(ablation, workdir)
  ablation.methods = ml_collections.ConfigDict({"tf_s": "transfusion", "tf_l": "transfusion"})
  with pytest.raises(config_lib.ConfigError, match="config.methods: no variant of the method 'chameleon'"):
    ablate.collect(ablation, workdir)
  del ablation.methods
  os.remove(f"{workdir}/scaling.json")
  table = ablate.collect(ablation, workdir)
  assert not os.path.exists(f"{workdir}/scaling.json") and any("paired" in t for t in table.values())
