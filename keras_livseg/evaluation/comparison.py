"""Several models scored on the same cases: means over seeds, paired tests, one report.

The statistics half of ``python -m keras_livseg.compare`` (the training half is
:mod:`keras_livseg.training.compare`). Inputs are what every run already writes: its LiTS
``metrics.json`` and ``per_case.csv`` on the held-out volumes.

- :func:`mean_metrics` / :func:`spread_metrics`: one ``metrics.json`` per seed → their mean
  (and standard deviation), leaf by leaf, so that the papers' tables
  (:func:`~keras_livseg.evaluation.report.paper_tables`) show the mean over seeds.
- :func:`paired_test`: Wilcoxon signed-rank test per case between two models (the per-case
  Dice averaged over seeds first, so a case counts once), with the smallest p-value the number
  of cases allows, so that a reader knows when no difference could have been significant.
- :func:`render_comparison`: the report (``report.md``).

Example:

>>> paired_test([0.9, 0.8, 0.85, 0.7, 0.95, 0.6], [0.8, 0.7, 0.8, 0.65, 0.9, 0.5])["p_value"]
0.03125
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

#: Region → per_case.csv column of the paired tests.
TEST_COLUMNS = {"liver": "liver_dice", "tumor": "tumor_dice"}


def _numbers(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))]


def _reduce(items: Sequence[Any], numeric) -> Any:
    first = items[0]
    if isinstance(first, Mapping):
        keys = [k for k in first if all(isinstance(i, Mapping) and k in i for i in items)]
        return {k: _reduce([i[k] for i in items], numeric) for k in keys}
    if isinstance(first, (int, float)) and not isinstance(first, bool) or first is None:
        values = _numbers(items)
        return numeric(values) if values else None
    return first  # strings, lists, flags: the first seed's


def mean_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Leaf-wise mean of several ``metrics.json`` (one per seed); NaN/None values are left out.

    Example:

    >>> mean_metrics([{"volume": {"liver": {"dice": 0.75}}}, {"volume": {"liver": {"dice": 0.25}}}])
    {'volume': {'liver': {'dice': 0.5}}}
    """
    if not metrics:
        raise ValueError("mean_metrics needs at least one metrics dict")
    return _reduce(list(metrics), lambda v: float(np.mean(v)))


def spread_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Leaf-wise ``{"std", "min", "max"}`` over seeds, same nesting as :func:`mean_metrics`."""
    return _reduce(list(metrics), lambda v: {"std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                                             "min": float(np.min(v)), "max": float(np.max(v))})


def smallest_p_value(n: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon signed-rank test can give with ``n`` pairs.

    All ``n`` differences with the same sign: ``2 / 2**n``. With 5 pairs it is 0.0625, so fewer
    than 6 cases can never show a difference at the 0.05 level.

    Example:

    >>> smallest_p_value(5), smallest_p_value(6)
    (0.0625, 0.03125)
    """
    return 1.0 if n < 1 else min(1.0, 2.0 / 2**n)


def paired_test(candidate: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of per-case scores, candidate against baseline.

    Pairs with a NaN on either side are dropped (counted). Zero differences are dropped as in
    Wilcoxon's original test (``zero_method="wilcox"``); all-zero differences give p = 1.

    Returns:
        ``{"n", "dropped", "median_difference", "mean_difference", "wins", "losses", "ties",
        "statistic", "p_value", "smallest_possible_p"}``; differences are candidate − baseline.
    """
    from scipy.stats import wilcoxon

    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs the same cases on both sides, got {a.size} and {b.size} scores")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    result: dict[str, Any] = {
        "n": int(keep.sum()), "dropped": int((~keep).sum()),
        "median_difference": float(np.median(diff)) if diff.size else math.nan,
        "mean_difference": float(np.mean(diff)) if diff.size else math.nan,
        "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()), "ties": int((diff == 0).sum()),
        "smallest_possible_p": smallest_p_value(int((diff != 0).sum())),
    }
    if not np.any(diff != 0):
        result.update(statistic=math.nan, p_value=1.0 if diff.size else math.nan)
        return result
    test = wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result


def per_case_means(rows: Sequence[Mapping[str, Any]], column: str) -> dict[str, float]:
    """Per case, the mean of ``column`` over the seeds' rows (``case_id`` keys); NaN when all are NaN."""
    grouped: dict[str, list[float]] = {}
    for row in rows:
        try:
            value = float(row.get(column))
        except (TypeError, ValueError):
            value = math.nan
        grouped.setdefault(str(row["case_id"]), []).append(value)
    return {case: (float(np.nanmean(v)) if np.isfinite(v).any() else math.nan) for case, v in grouped.items()}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{float(value):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mean_sd(mean: Any, spread: Any, digits: int = 4) -> str:
    if not isinstance(spread, Mapping) or mean is None:
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(spread['std'], digits)} ({_fmt(spread['min'], digits)}–{_fmt(spread['max'], digits)})"


def render_comparison(summary: Mapping[str, Any]) -> str:
    """``report.md`` of a comparison, from the dict :func:`keras_livseg.training.compare.compare_runs` writes."""
    from keras_livseg.evaluation.report import paper_tables

    models = summary["models"]
    names = [m["name"] for m in models]
    seeds = summary["seeds"]
    lines = [
        f"# Comparison: {', '.join(names)}",
        "",
        f"- data: `{summary['data']}`; scored: {len(summary['cases'])} held-out case(s) of the `{summary['split']}` "
        f"split ({summary['covers']}): {', '.join(summary['cases'])}",
        f"- same recipe for every model: `{summary['recipe']}`, {summary['budget']}; seeds {', '.join(map(str, seeds))}",
        "- figures are the mean over seeds; ± is the standard deviation over seeds, then the range",
        "",
        "## Models",
        "",
        _table(
            ["Model", "Parameters (trainable)", "GFLOPs per slice", "Training slices/s", "Inference slices/s",
             "Training time (min, mean over seeds)"],
            [[m["name"], _fmt(m["parameters"]["trainable"]),
              _fmt(m["flops"] / 1e9, 3) if m.get("flops") else "n/a",
              _fmt(m["speed"].get("train_slices_per_s"), 1) if m.get("speed") else "n/a",
              _fmt(m["speed"].get("inference_slices_per_s"), 1) if m.get("speed") else "n/a",
              _fmt(m.get("training_minutes"), 2)] for m in models],
        ),
        "",
        f"FLOPs: 2 per multiply-add, one {summary['input_shape']} slice, inference graph. Speeds: in-memory batches of "
        f"{summary.get('speed_batch', 'n/a')}, this machine ({summary.get('machine', 'not recorded')}), measured one "
        "model after another in one process.",
        "",
        "## Dice over seeds (whole held-out volumes)",
        "",
        _table(
            ["Model", "Liver Dice (mean per case)", "Tumour Dice (mean per case)", "Liver Dice global", "Tumour Dice global"],
            [[m["name"]] + [_mean_sd(m["mean"]["volume"][region][key], m["spread"]["volume"][region][key])
                            for key in ("dice", "dice_global") for region in ("liver", "tumor")]
             for m in models],
        ),
        "",
        "## Paired tests against the first model",
        "",
        f"Two-sided Wilcoxon signed-rank test on per-case Dice (each case's Dice averaged over the seeds first), "
        f"{names[0]} as the baseline. Differences are model − {names[0]}.",
        "",
    ]
    test_rows = []
    for m in models[1:]:
        for region, test in m["paired_tests"].items():
            verdict = ("not testable" if not test["n"] else
                       "significant (p < 0.05)" if test["p_value"] < 0.05 else
                       f"cannot be significant with {test['n']} cases" if test["smallest_possible_p"] >= 0.05 else
                       "not significant")
            test_rows.append([m["name"], region, test["n"], _fmt(test["median_difference"]), _fmt(test["mean_difference"]),
                              f"{test['wins']}/{test['losses']}/{test['ties']}", _fmt(test["p_value"]), verdict])
    lines.append(_table(["Model", "Class", "Cases", "Median difference", "Mean difference", "Better/worse/tied",
                         "p", "Verdict"], test_rows) if test_rows else "(one model: nothing to test)")
    if summary["cases"] and smallest_p_value(len(summary["cases"])) >= 0.05:
        lines += ["", f"With {len(summary['cases'])} held-out cases the smallest possible p is "
                      f"{smallest_p_value(len(summary['cases'])):.4f}: no difference can reach 0.05. Score more "
                      "cases (a larger test split or cross-validation) before calling a model better."]
    lines += ["", "## The papers' tables (mean over seeds)", "", paper_tables([(m["name"], m["mean"]) for m in models])]
    figures = summary.get("figures") or {}
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{title}]({path})\n\n{title}\n" for title, path in figures.items()]
    return "\n".join(lines) + "\n"
