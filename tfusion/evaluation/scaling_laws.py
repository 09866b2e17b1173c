"""Scaling trendlines and the parity FLOP ratio of two methods (paper §4.2, Table 3: Transfusion vs Chameleon).

Each metric is fitted per method as a line in log-log space over every run of the method (all sizes and token
budgets), log(value) = intercept + slope * log(FLOPs) with natural logs and least squares, FLOPs counted as 6 N D
(N parameters, D elements trained on) as the paper counts them. The parity FLOP ratio of a metric is the FLOPs
the candidate's trendline needs to reach the reference's measured value at the reference's largest run, over
that run's FLOPs: below 1 the candidate gets there with less compute. The paper's reference is Chameleon-7B and
its candidate Transfusion (Table 3: 0.489 for C4 perplexity, 0.218 for COCO CIDEr, 0.029 for FID).

  report = scaling_report(table, {"tf_small": "transfusion", "ch_small": "chameleon", ...})   # ablate.collect()
  print(table3_markdown(report)); plot(report, "scaling.png")
"""
import dataclasses
import math
from typing import NamedTuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

REFERENCE, CANDIDATE = "chameleon", "transfusion"
FLAT_SLOPE = 1e-3   # |slope| below this: < 0.23% change of the metric per 10x FLOPs, no usable trend


class Metric(NamedTuple):
  key: str                 # the number's key in ablate's table: suite.scalars of the eval report
  higher_is_better: bool
  label: str


# The numbers of the paper's Table 3 that the evaluation suite produces, plus the shapes checker's exact match
# and text-to-image accuracy. Left out: FID (its real images are the codec's reconstructions on latent sources,
# VQ for one method and VAE for the other) and the held-out image loss (an eps MSE; Chameleon has none).
METRICS = {
    "text_perplexity": Metric("eval/text/perplexity", False, "Text perplexity ↓"),
    "caption_cider": Metric("eval/image_to_text/cider", True, "Captioning CIDEr ↑"),
    "caption_exact_match": Metric("eval/image_to_text/shapes_exact", True, "Caption exact match ↑"),
    "t2i_checker_objects": Metric("eval/text_to_image/shapes_objects", True, "Text-to-image checker, objects ↑"),
    "t2i_checker_all": Metric("eval/text_to_image/shapes_all", True, "Text-to-image checker, all ↑"),
    "clip_score": Metric("eval/text_to_image/clip_score", True, "CLIP score ↑"),
}


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """value = exp(intercept) * flops ** slope, fitted on runs from flops_range[0] to flops_range[1] FLOPs."""
  slope: float
  intercept: float
  flops_range: tuple[float, float]

  def predict(self, flops):
    """The trendline's value at `flops` (a number or an array)."""
    return np.exp(self.intercept + self.slope * np.log(flops))

  def flops_for(self, value: float) -> float:
    """The FLOPs at which the trendline reaches `value` (> 0)."""
    if not value > 0 or self.slope == 0:
      raise ValueError(f"flops_for: needs a value > 0 and a nonzero slope, got value {value}, slope {self.slope}")
    return math.exp((math.log(value) - self.intercept) / self.slope)


def fit_power_law(flops, values, name: str = "values") -> PowerLaw:
  """Least-squares line through (log flops, log values), both [n]; `name` (metric, method) goes into errors."""
  flops, values = np.asarray(flops, np.float64), np.asarray(values, np.float64)
  if flops.ndim != 1 or flops.shape != values.shape:
    raise ValueError(f"{name}: FLOPs {flops.shape} and values {values.shape} must be two lists of one length")
  if not np.all(np.isfinite(values) & (values > 0)) or not np.all(np.isfinite(flops) & (flops > 0)):
    raise ValueError(f"{name}: a log-log fit needs values and FLOPs > 0, got values {values.tolist()} at FLOPs "
                     f"{flops.tolist()}")
  if len(np.unique(flops)) < 2:
    raise ValueError(f"{name}: a fit needs runs at 2 or more distinct FLOP counts, got {np.unique(flops).tolist()}")
  slope, intercept = np.polyfit(np.log(flops), np.log(values), 1)
  return PowerLaw(float(slope), float(intercept), (float(flops.min()), float(flops.max())))


@dataclasses.dataclass(frozen=True)
class Parity:
  """ratio: candidate FLOPs at parity / reference FLOPs (None, with a reason, when the trend never gets there);
  flops: the candidate's FLOPs at parity; extrapolated: whether they lie outside its measured FLOP range."""
  ratio: float | None = None
  flops: float | None = None
  extrapolated: bool | None = None
  reason: str | None = None


def parity_ratio(candidate: PowerLaw, reference_value: float, reference_flops: float, higher_is_better: bool,
                 flat_slope: float = FLAT_SLOPE) -> Parity:
  """The parity FLOP ratio: candidate.flops_for(reference_value) / reference_flops, where reference_value is the
  reference method's measured value at its largest run of reference_flops. None when the candidate's trendline
  is flat (|slope| < flat_slope) or gets worse with compute: it would reach the value only by shrinking."""
  if abs(candidate.slope) < flat_slope:
    return Parity(reason=f"the candidate's trendline is flat (slope {candidate.slope:.3g})")
  if (candidate.slope > 0) != higher_is_better:
    return Parity(reason=f"the candidate's trendline gets worse with compute (slope {candidate.slope:.3g}, "
                         f"{'higher' if higher_is_better else 'lower'} is better)")
  flops = candidate.flops_for(reference_value)
  low, high = candidate.flops_range
  return Parity(flops / reference_flops, flops, not low <= flops <= high)


def _largest_run(table: dict, variants: list[str]) -> str:
  """The variant of the most 6ND FLOPs (ties: the most parameters)."""
  def size(v):
    numbers = table[v]["numbers"]
    return numbers["flops_6nd"]["mean"], numbers.get("params", {}).get("mean", 0.0)
  return max(variants, key=size)


def scaling_report(table: dict, methods: dict[str, str], reference: str = REFERENCE, candidate: str = CANDIDATE,
                   metrics: dict[str, Metric] = METRICS) -> dict:
  """Per metric and method the points (6ND FLOPs, mean over seeds) of its finished variants and their fit, the
  values at each method's largest run and the parity FLOP ratio of candidate against reference.

  table: ablate.collect()'s, {variant: {"numbers": {key: {"mean", "std", "values"}}}} with numbers["flops_6nd"];
  methods: variant -> method. A method with a variant that lacks a metric's number or has it <= 0 gets no fit
  for that metric, with the reason in the report; so does the parity without a fit or a reference value."""
  unknown = sorted(set(methods) - set(table))
  if unknown:
    raise ValueError(f"methods: {unknown} are not variants of the table {sorted(table)}")
  for role, method in (("reference", reference), ("candidate", candidate)):
    if method not in methods.values():
      raise ValueError(f"methods: no variant of the {role} method {method!r} among {sorted(set(methods.values()))}")
  finished = {v for v in methods if "flops_6nd" in table[v]["numbers"]}
  by_method = {m: [v for v in methods if methods[v] == m and v in finished] for m in dict.fromkeys(methods.values())}
  largest = {m: _largest_run(table, variants) for m, variants in by_method.items() if variants}
  report = dict(reference=reference, candidate=candidate, flops="6ND", methods=by_method,
                unfinished=[v for v in methods if v not in finished],
                largest_runs={m: dict(variant=v, flops=table[v]["numbers"]["flops_6nd"]["mean"])
                              for m, v in largest.items()},
                metrics={})
  for name, metric in metrics.items():
    entry = dict(key=metric.key, label=metric.label, higher_is_better=metric.higher_is_better, methods={})
    fits = {}
    for method, variants in by_method.items():
      points, bad = [], []
      for v in variants:
        number = table[v]["numbers"].get(metric.key)
        if number is None or not number["mean"] > 0:
          bad.append(f"{v} ({'missing' if number is None else number['mean']})")
        else:
          points.append(dict(variant=v, flops=table[v]["numbers"]["flops_6nd"]["mean"], value=number["mean"],
                             std=number["std"]))
      skipped = f"no value > 0 at {', '.join(bad)}" if bad else None
      if not skipped:
        try:
          fits[method] = fit_power_law([p["flops"] for p in points], [p["value"] for p in points],
                                       f"{name} of {method}")
        except ValueError as e:
          skipped = str(e)
      run = table[largest[method]]["numbers"].get(metric.key) if method in largest else None
      entry["methods"][method] = dict(points=points, fit=dataclasses.asdict(fits[method]) if method in fits else None,
                                      skipped=skipped,
                                      largest_run=None if run is None else dict(mean=run["mean"], std=run["std"]))
    reference_run = entry["methods"][reference]["largest_run"]
    if candidate not in fits:
      parity = Parity(reason=f"{candidate}: {entry['methods'][candidate]['skipped']}")
    elif reference_run is None or not reference_run["mean"] > 0:
      parity = Parity(reason=f"{reference}: no value > 0 at its largest run")
    else:
      parity = parity_ratio(fits[candidate], reference_run["mean"], report["largest_runs"][reference]["flops"],
                            metric.higher_is_better)
    entry["parity"] = dataclasses.asdict(parity)
    report["metrics"][name] = entry
  return report


def _value(run: dict | None) -> str:
  return "—" if run is None else f"{run['mean']:.4g} ± {run['std']:.2g}"


def table3_markdown(report: dict) -> str:
  """The paper's Table 3 turned on its side: metrics as rows; the reference's and the candidate's value (mean ±
  std over seeds) at their largest runs, the parity FLOP ratio and whether the candidate's trendline is
  interpolated or extrapolated there (or why there is no ratio)."""
  reference, candidate, runs = report["reference"], report["candidate"], report["largest_runs"]

  def header(method):
    return f"{method} ({runs[method]['variant']}, {runs[method]['flops']:.3g} FLOPs)" if method in runs else method
  lines = [f"| metric | {header(reference)} | {header(candidate)} | parity FLOP ratio | candidate trendline |",
           "|---|---|---|---|---|"]
  for entry in report["metrics"].values():
    parity = entry["parity"]
    if parity["ratio"] is None:
      ratio, note = "—", parity["reason"]
    else:
      low, high = entry["methods"][candidate]["fit"]["flops_range"]
      ratio = f"{parity['ratio']:.3g}"
      note = (f"extrapolated to {parity['flops']:.3g} FLOPs (runs {low:.3g} to {high:.3g})" if parity["extrapolated"]
              else f"interpolated at {parity['flops']:.3g} FLOPs")
    lines.append(f"| {entry['label']} | {_value(entry['methods'][reference]['largest_run'])} | "
                 f"{_value(entry['methods'][candidate]['largest_run'])} | {ratio} | {note} |")
  lines += ["", f"FLOPs are 6ND (N parameters, D elements trained on), as the paper counts them (§4.2). The parity "
            f"FLOP ratio is the FLOPs {candidate}'s trendline needs to reach {reference}'s value at its largest run, "
            f"over that run's FLOPs; below 1, {candidate} needs less compute."]
  if report["unfinished"]:
    lines.append(f"Unfinished variants, not counted: {', '.join(report['unfinished'])}.")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  """A PNG at `path`: one log-log panel per metric with points, each method's trendline and the parity point
  (the reference's largest-run value on the candidate's trendline)."""
  entries = [e for e in report["metrics"].values() if any(m["points"] for m in e["methods"].values())]
  columns = min(3, max(len(entries), 1))
  rows = -(-max(len(entries), 1) // columns)
  figure = Figure(figsize=(4.5 * columns, 3.6 * rows), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  if not entries:
    axes[0].text(0.5, 0.5, "no finished run with these metrics", ha="center", va="center")
  for ax, entry in zip(axes, entries):
    flops = [p["flops"] for m in entry["methods"].values() for p in m["points"]]
    if entry["parity"]["flops"] is not None:
      flops.append(entry["parity"]["flops"])
    grid = np.geomspace(min(flops), max(flops), 50)
    for method, fitted in entry["methods"].items():
      dots = ax.plot([p["flops"] for p in fitted["points"]], [p["value"] for p in fitted["points"]], "o", label=method)
      if fitted["fit"]:
        law = PowerLaw(**fitted["fit"])
        ax.plot(grid, law.predict(grid), "-", color=dots[0].get_color(), label=f"{method}: slope {law.slope:.3g}")
    if entry["parity"]["ratio"] is not None:
      ax.plot(entry["parity"]["flops"], entry["methods"][report["reference"]]["largest_run"]["mean"], "kx",
              markersize=9, label=f"parity: ratio {entry['parity']['ratio']:.3g}")
    ax.set(xscale="log", yscale="log", title=entry["label"], xlabel="FLOPs (6ND)")
    ax.legend(fontsize="small")
  for ax in axes[max(len(entries), 1):]:
    ax.set_visible(False)
  figure.savefig(path, dpi=100)
