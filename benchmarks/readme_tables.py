"""The README's benchmark tables, generated from the committed JSON in ``benchmarks/results/``.

    python -m benchmarks.readme_tables             # rewrite every table whose JSON exists
    python -m benchmarks.readme_tables --check     # exit 1 when the README differs from the JSON

Each table sits in the README between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
:data:`RENDERERS` maps NAME to a function of ``results/NAME.json`` that returns the Markdown,
goals and ✓/✗ included, so a figure in the README is always one that a script wrote.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
sys.path.insert(0, str(HERE))
from _common import results_dir  # noqa: E402
from bench_models import params_cell  # noqa: E402  (the same cell as the script's own table)


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("✓" if ok else "✗")


def _fresh_runs(fresh: dict) -> str:
    """What the first-run time is when several runs were made: their median, and each.

    >>> _fresh_runs({"minutes": 4.8, "runs": [{"minutes": 5.27}, {"minutes": 4.8}, {"minutes": 4.61}]})
    '; median of 3 runs, one after the other (5.3, 4.8, 4.6 min)'
    >>> _fresh_runs({"minutes": 4.3})
    ''
    """
    runs = fresh.get("runs", [])
    if len(runs) < 2:
        return ""
    each = ", ".join(f"{run['minutes']:.1f}" for run in runs)
    return f"; median of {len(runs)} runs, one after the other ({each} min)"


def _n(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _machine_line(data: dict) -> str:
    machine = data.get("machine", {})
    cpu = machine.get("cpu", "CPU not recorded")
    flags = machine.get("cpu_flags")
    if flags is not None:  # older JSON did not record them
        cpu += f" ({_cpu_class(flags)})"
    libraries = machine.get("libraries", {})
    versions = ", ".join(f"{k} {v}" for k, v in libraries.items() if k in ("tensorflow", "keras", "torch", "jax"))
    cores = machine.get("cores_usable", machine.get("cpus", "?"))
    load = machine.get("load_average_at_write")
    date = machine.get("date")  # older JSON did not record it
    return (f"_Measured on {cpu}, {cores} cores{f', load {load[0]:.1f}' if load else ''}{f', {date}' if date else ''}"
            f"{f'; {versions}' if versions else ''}._")


def _cpu_class(flags: list[str] | None) -> str:
    if flags is None:
        return "CPU not recorded"
    wide = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(wide) if wide else "AVX2, no AVX-512"


def render_run_all(data: dict) -> str:
    """The index of benchmarks: each script's command, and its last run through ``run_all``."""
    rows, timed = [], []
    for entry in data.get("benchmarks", []):
        command = " ".join([f"`python benchmarks/{entry['script']}", *entry["args"]]) + "`"
        last = entry.get("last_run")
        if last is None:
            when = "not yet through the runner: its JSON was written by the script alone"
        else:
            timed.append(last["minutes"])
            status = "ok" if last["returncode"] == 0 else f"failed (exit {last['returncode']})"
            when = f"{last['date'] or 'date not recorded'}, {last['minutes']:.1f} min, {status}"
            if last.get("cpu_flags") is not None:
                when += f", {last['cpu']} ({_cpu_class(last['cpu_flags'])})"
        real = " (needs `../shared/data/real`)" if entry.get("needs_real_data") else ""
        rows.append(f"| {entry['name']} | {command}{real} | {entry['what']} | {when} |")
    head = ("| benchmark | command | what it measures | last run through `python -m benchmarks.run_all` |\n"
            "| --- | --- | --- | --- |")
    total = (f"{len(timed)} of {len(rows)} benchmarks timed through the runner: {sum(timed) / 60:.1f} h together; "
             "the others are not in that sum.")
    return "\n".join([head, *rows, "", total])


def render_prepare(data: dict) -> str:
    default, single = data["prepare_workers_default"], data["prepare_workers_1"]
    rows = [
        "| what | wall s | × floor (goal ≤ 1.5) | peak RSS per worker | RSS / one volume (goal ≤ 2.5) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    floor = data.get("floor_s", data["load_s"])
    rows.append(f"| nibabel load of volumes + segmentations | {data['load_s']:.2f} | {data['load_s'] / floor:.2f} | "
                f"{_n(data.get('load_peak_rss_mb'), '.0f')} MB | {_n(data.get('load_rss_over_volume'))} |")
    if "read_s" in data:
        rows.append(f"| the same with keras_livseg's reader (ISA-L gzip) | {data['read_s']:.2f} | {data['read_s'] / floor:.2f} | | |")
    for label, run in (("`prepare`, default workers (one per core)", default), ("`prepare`, 1 worker", single)):
        rows.append(
            f"| {label} | {run['wall_s']:.2f} | **{run['x_floor']:.2f}** {_mark(run['x_floor'] <= 1.5)} | "
            f"{run['worker_peak_rss_mb']:.0f} MB | {run['rss_over_volume']:.2f} raw, **{run['rss_above_imports_over_volume']:.2f}** "
            f"above imports {_mark(run['rss_above_imports_over_volume'] <= 2.5)} |"
        )
    head = (f"{data['cases']} phantom volumes of {data.get('size', 512)}×{data.get('size', 512)}×"
            f"{'–'.join(map(str, data.get('slices', (200, 300))))} (int16), largest {data['volume_mb']:.0f} MB decompressed; "
            f"model size {data.get('image_size', 256)}.")
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def render_pipeline(data: dict) -> str:
    goals = data.get("goals", {"slices_per_s": 2000, "ratio": 20})
    rate, ratio, cpu = data["pipeline_slices_per_s"], data["ratio_typical"], data["cpu_ms_per_slice"]
    typical, vectorized = data["naive_typical_slices_per_s"], data["naive_vectorized_slices_per_s"]
    rows = [
        f"| loader | slices/s (goal ≥ {goals['slices_per_s']:,}) | CPU ms / slice | × typical naive (goal ≥ {goals['ratio']}) | × vectorized naive |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| `make_dataset`: shards read every epoch, oversampling, full augmentation | **{rate:,.0f}** "
        f"{_mark(rate >= goals['slices_per_s'])} | {cpu['pipeline']:.2f} | **{ratio:.1f}** {_mark(ratio >= goals['ratio'])} | "
        f"{data['ratio_vectorized']:.1f} |",
        f"| `make_dataset`, same reading, no augmentation | {data['pipeline_no_augmentation_slices_per_s']:,.0f} | "
        f"{cpu['no_augmentation']:.2f} | {data['pipeline_no_augmentation_slices_per_s'] / typical:.1f} | "
        f"{data['pipeline_no_augmentation_slices_per_s'] / vectorized:.1f} |",
        f"| `make_dataset`, `cache=True` (in memory after the first epoch: not compared with loaders that read disk) | "
        f"{data['pipeline_cached_slices_per_s']:,.0f} | {cpu['cached']:.2f} | – | – |",
        f"| naive, typical: `get_fdata()` + `scipy.ndimage.zoom` per slice, every epoch | {typical:,.0f} | {cpu['typical']:.2f} | 1.0 | "
        f"{typical / vectorized:.2f} |",
        f"| naive, vectorized: re-read NIfTI every epoch, this package's NumPy preprocessing | {vectorized:,.0f} | "
        f"{cpu['vectorized']:.2f} | {vectorized / typical:.1f} | 1.0 |",
    ]
    head = (f"{data['slices']} slices at {data['size']}×{data['size']}, batch {data['batch_size']}, best of "
            f"{data['rounds']} alternating rounds; CPU time per slice: the pipeline uses "
            f"{data['cpu_ratio_typical']:.1f}× less than the typical naive loader.")
    augment = data.get("augment_cpu_ms_per_batch")
    if augment:
        names = {"opencv": "OpenCV + NumPy, one pass (the default)", "tensorflow": "TensorFlow's kernels (without OpenCV)"}
        rows += ["", f"The augmentation alone, CPU ms a batch of {data['batch_size']} (a transform's cost: everything, "
                     "less a run without it):", "",
                 "| augmentation path | everything | warp | noise | gamma |", "| --- | ---: | ---: | ---: | ---: |"]
        rows += [f"| {names.get(path, path)} | {c['all']:.1f} | {c['warp']:.1f} | {c['noise']:.1f} | {c['gamma']:.1f} |"
                 for path, c in augment.items()]
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def render_predict(data: dict) -> str:
    ratio, rss = data["ratio"], data["predict_peak_rss_gb"]
    rows = [
        "| what | seconds | × forward (goal ≤ 1.3) | peak RSS (goal ≤ 3 GB) |",
        "| --- | ---: | ---: | ---: |",
        f"| the model's forward pass over the {data.get('slices', 119)} slices | {data['forward_s']:.1f} | 1.00 | "
        f"{_n(data.get('forward_peak_rss_gb'))} GB |",
    ]
    if "predict_without_postprocessing_s" in data:
        bare = data["predict_without_postprocessing_s"]
        bare_rss = data.get("predict_without_postprocessing_peak_rss_gb")
        rows.append(f"| `predict` without post-processing (`--no-postprocess`) | {bare:.1f} | {bare / data['forward_s']:.2f} | "
                    f"{'' if bare_rss is None else f'{bare_rss:.2f} GB'} |")
    rows.append(
        f"| `predict`: read NIfTI, preprocess, forward, resize back, post-process, write NIfTI | {data['predict_s']:.1f} | "
        f"**{ratio:.2f}** {_mark(ratio <= 1.3)} | **{rss:.2f} GB** {_mark(rss <= 3.0)} |"
    )
    if data.get("trained_by"):
        rows += ["", f"A trained model, `{data['checkpoint']}`: {data['trained_by']}. Before post-processing it "
                 f"labels {data['labelled_fraction']:.1%} of the volume liver or tumour."]
    elif data.get("checkpoint"):
        rows += ["", f"A trained model, `{data['checkpoint']}`: the phantom demo (`benchmarks/bench_real.py demo` trains "
                 f"it with seed 0, as `python -m keras_livseg.fit` does). Before post-processing it labels "
                 f"{data['labelled_fraction']:.1%} of the volume liver or tumour."]
    elif "labelled_fraction" in data:
        rows += ["", f"The model's weights are random (seed 0): before post-processing it labels "
                 f"{data['labelled_fraction']:.0%} of the volume liver or tumour (a trained model: the liver, a few "
                 "per cent); post-processing works inside the bounding box of what is labelled, so its share "
                 "of the time depends on the prediction."]
    head = (f"{data.get('size', 512)}×{data.get('size', 512)}×{data.get('slices', 119)} phantom volume, "
            f"{data['model']} base {data['filters']} at {data.get('image_size', 256)}×{data.get('image_size', 256)}, batch 8.")
    if data.get("repeats", 1) > 1:
        runs = data["predict_runs_s"]
        head += (f" Medians of {data['repeats']} runs of each, taking turns in fresh processes (`predict` "
                 f"{min(runs):.1f}–{max(runs):.1f} s; forward {min(data['forward_runs_s']):.1f}–{max(data['forward_runs_s']):.1f} s).")
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def render_fit_loop(data: dict) -> str:
    ratio, batch = data["ratio"], data["batch"]
    rows = [
        "| input | steps/s | slices/s | ratio (goal ≥ 0.9) |",
        "| --- | ---: | ---: | ---: |",
        f"| in-memory random tensors, no metrics | {data['in_memory_steps_per_s']:.2f} | {data['in_memory_steps_per_s'] * batch:.1f} | 1.00 |",
        f"| TFRecord shards with augmentation, oversampling and all metrics | {data['shards_steps_per_s']:.2f} | "
        f"{data['shards_steps_per_s'] * batch:.1f} | **{ratio:.2f}** {_mark(ratio >= 0.9)} |",
    ]
    patches = data.get("patches")
    if patches:
        crop, patch_ratio = patches["crop"], patches["ratio"]
        rows += [
            f"| {crop}×{crop} patches (as the demo trains), in-memory random tensors, no metrics | "
            f"{patches['in_memory_steps_per_s']:.2f} | {patches['in_memory_steps_per_s'] * batch:.1f} | 1.00 |",
            f"| {crop}×{crop} patches from the shards: the recipe's augmentation, tumour sampling, optimizer and loss, all metrics | "
            f"{patches['shards_steps_per_s']:.2f} | {patches['shards_steps_per_s'] * batch:.1f} | "
            f"**{patch_ratio:.2f}** {_mark(patch_ratio >= 0.9)} |",
        ]
    shape = "×".join(map(str, data.get("input", ())))
    head = f"The demo's model ({data.get('model', 'tam_unet')}, {shape}) and data, batch {batch}, {data['policy']}."
    if patches:
        head += (f" Patch rows: best of {patches['rounds']} alternating rounds of {patches['steps']} steps, "
                 "the any-size twin that fit trains.")
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def _models_ratio_cell(ratio: float | None, row: dict) -> str:
    if ratio is None:
        return "–"
    if not row.get("torch_side", {}).get("same_architecture", True):
        return f"{ratio:.2f} (not comparable)"
    return f"**{ratio:.2f}** {_mark(ratio >= 1.5)}"


def render_models(data: dict) -> str:
    settings = data["settings"]
    batch = settings["batch"]
    peak = (data.get("float32_matmul_peak_gflops") or {}).get("peak")
    rows = [
        "| model | params | GFLOPs/slice (fwd) | Keras f32 s/step | PyTorch f32 s/step | Keras f32 slices/s | "
        "Keras/PyTorch f32 (goal ≥ 1.5) | Keras bf16 s/step | PyTorch bf16 s/step | Keras/PyTorch bf16 | "
        "share of f32 peak (Keras / PyTorch) | PyTorch side | params = PyTorch's | peak RSS MB (Keras f32 / bf16 / PyTorch f32) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]

    def ratio(keras: dict, torch: dict) -> float | None:
        return torch["step_s"] / keras["step_s"] if "step_s" in keras and "step_s" in torch else None

    for row in data["rows"]:
        k32, kbf = row.get("keras_float32", {}), row.get("keras_mixed_bfloat16", {})
        p32, pbf = row.get("torch_float32", {}), row.get("torch_mixed_bfloat16", {})
        k_rate = batch / k32["step_s"] if "step_s" in k32 else None
        rss = " / ".join(_n(d.get("peak_rss_mb"), ".0f") for d in (k32, kbf, p32))
        params = f"{k32['params']:,}" if "params" in k32 else "–"
        shares = " / ".join("–" if row.get(k) is None else f"{100 * row[k]:.0f} %"
                            for k in ("keras_share_of_peak", "torch_share_of_peak"))
        bf_ratio = ratio(kbf, pbf)
        bf_cell = "–" if bf_ratio is None else (
            f"{bf_ratio:.2f}" if row.get("torch_side", {}).get("same_architecture", True) else f"{bf_ratio:.2f} (not comparable)")
        rows.append(
            f"| {row['model']} | {params} | {_n(k32.get('gflops_per_slice'))} | {_n(k32.get('step_s'), '.3f')} | "
            f"{_n(p32.get('step_s'), '.3f')} | {_n(k_rate, '.1f')} | {_models_ratio_cell(ratio(k32, p32), row)} | "
            f"{_n(kbf.get('step_s'), '.3f')} | {_n(pbf.get('step_s'), '.3f')} | {bf_cell} | {shares} | "
            f"{row['torch_side']['built_by']} | {params_cell(row)} | {rss} |"
        )
    optimizer = ("Adam as fit makes it (FusedAdam, one fused update per variable, built before the first step)"
                 if settings.get("keras_optimizer") == "fit" else "Adam")
    head = (f"{settings['size']}×{settings['size']}×{settings['channels']}, batch {batch}, train step = {optimizer} + cross "
            f"entropy; U-Nets base {settings['filters']}, depth {settings['depth']}; effb0_pan decoder "
            f"{settings['decoder_filters']}; the others at their registry defaults; s/step = best of {settings['steps']} "
            f"steps after {settings['warmup']} warm-up (medians and every step in models.json); bf16 = Keras' "
            "mixed_bfloat16 policy and PyTorch's CPU autocast.")
    if peak:
        head += (f" Share of f32 peak: the f32 train step at 3× the forward GFLOPs against this machine's float32 "
                 f"matrix-multiply peak measured in the same run ({peak:.0f} GFLOP/s, best of TensorFlow and PyTorch).")
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def render_memory(data: dict) -> str:
    config = data["config"]
    rows = [
        "| model | Keras peak RSS, keras.optimizers.Adam | Keras peak RSS, fit's optimizer | PyTorch peak RSS | "
        "Keras step: RSS rise | = traced graph and kernels | + live tensors (TF's peak in a step) | + rest | "
        "PyTorch step: RSS rise | live tensors ≤ PyTorch's step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in data["rows"]:
        torch_step = row.get("torch_step_rss_mb")
        fits = None if torch_step is None else row["keras_live_peak_mb"] <= torch_step
        rows.append(
            f"| {row['model']} | {_n(row.get('keras_adam_peak_rss_mb'), ',.0f')} | {_n(row['keras_peak_rss_mb'], ',.0f')} | "
            f"{_n(row.get('torch_peak_rss_mb'), ',.0f')} | "
            f"{_n(row['keras_step_rss_mb'], ',.0f')} | {_n(row['keras_graph_mb'], ',.0f')} | "
            f"{_n(row['keras_live_peak_mb'], ',.0f')} | {_n(row['keras_rest_mb'], ',.0f')} | {_n(torch_step, ',.0f')} | "
            f"{_mark(fits)} |"
        )
    head = (f"MB; {config['size']}×{config['size']}×{config['channels']}, batch {config['batch']}, {config['policy']}, "
            f"{config['optimizer']} + {config['loss']}, the settings of the models table. Keras' Adam is built by Keras "
            "inside the first traced step; fit's optimizer (FusedAdam) is built before it, and the split that "
            "follows is for it. A step's RSS rise is the peak RSS after a few train steps less the RSS after import, "
            "build and compile. Traced graph and kernels: the same rise for the same model at 64 px and batch 1, "
            "where tensors are tiny.")
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def render_real_ct(data: dict) -> str:
    demo, sim, lopo = data["demo"]["summary"], data["sim2real"], data["lopo"]

    def spread(stat: dict, spec: str = ".3f") -> str:
        if stat["min"] == stat["max"]:  # one seed: no range to show
            return f"{stat['mean']:{spec}}"
        return f"{stat['mean']:{spec}} ({stat['min']:{spec}} – {stat['max']:{spec}})"

    tumour = _mean_tumour_by_case(sim)
    per_case = sim["per_case"]
    goal = sim.get("goal_liver_dice", 0.9)
    rows = [
        "| what | measured | goal | met |",
        "| --- | --- | --- | --- |",
        *([f"| demo wall time, first run on a new machine (empty cache: phantom, shards, training, scoring)"
           f"{_fresh_runs(data['fresh'])} | {data['fresh']['minutes']:.1f} min | ≤ 5 min | "
           f"{_mark(data['fresh']['minutes'] <= 5)} |",
           f"| demo wall time, training seeds 0–{len(data['demo']['runs']) - 1} (data cached) | {demo['minutes']['min']:.1f} – "
           f"{demo['minutes']['max']:.1f} min | | |"] if "fresh" in data else
          [f"| demo wall time ({len(data['demo']['runs'])} seeds, data made by the first) | {demo['minutes']['min']:.1f} – "
           f"{demo['minutes']['max']:.1f} min | ≤ 5 min | {_mark(demo['minutes']['max'] <= 5)} |"]),
        f"| demo held-out phantom liver Dice (mean per case; seeds: mean, range) | {spread(demo['liver_dice'])} | ≥ 0.95 | "
        f"{_mark(demo['liver_dice']['mean'] >= 0.95)} |",
        f"| demo held-out phantom tumour Dice (same) | {spread(demo['tumor_dice'])} | ≥ 0.75 | "
        f"{_mark(demo['tumor_dice']['mean'] >= 0.75)} |",
    ]
    if "tumor_dice_global" in demo:
        rows.append(f"| demo held-out phantom tumour Dice, global (the test volumes' voxels as one; seeds: mean, range) | "
                    f"{spread(demo['tumor_dice_global'])} | — | |")
    for key, what in (("tumor_dice_by_phase", "by contrast phase"),
                      ("tumor_dice_by_kind", "by the case's lesion kind (none: tumour-free)")):
        groups = [run.get(key) or {} for run in data["demo"]["runs"]]
        if all(groups):
            names = sorted(set().union(*groups), key=lambda g: -groups[0].get(g, {}).get("cases", 0))
            cells = []
            for name in names:
                values = [g[name]["tumor_dice"] for g in groups if name in g]
                cells.append(f"{name.replace('_', '-')} {sum(values) / len(values):.3f} "
                             f"({groups[0].get(name, {}).get('cases', '?')})")
            rows.append(f"| demo held-out phantom tumour Dice per case, {what} (mean over seeds; test cases) | "
                        f"{' · '.join(cells)} | — | |")
    unseen = data["demo"].get("unseen_phantom")
    if unseen and "unseen_tumor_dice" in demo:
        rows.append(f"| demo models on {unseen['cases']} unseen phantom cases (seed {unseen['seed']}, the same for every recipe "
                    f"and ablation): liver Dice / tumour Dice per case / tumour Dice global (seeds: mean, range) | "
                    f"{spread(demo['unseen_liver_dice'])} / {spread(demo['unseen_tumor_dice'])} / "
                    f"{spread(demo['unseen_tumor_dice_global'])} | — | |")
    if "tumor_dice_default_postprocessing" in demo:
        sizes = ", ".join(f"{run['min_lesion_mm3']:.0f}" for run in data["demo"]["runs"])
        rows.append(f"| the same with the default minimum lesion size (10 mm³) instead of the one each run chose on its "
                    f"validation volumes ({sizes} mm³) | {spread(demo['tumor_dice_default_postprocessing'])} | | |")
    if "lesion_recall" in demo:
        # What the per-case Dice does not show: how many lesions are found, the small ones apart.
        def detection(suffix: str = "") -> str:
            return " / ".join(spread(demo[f"{key}{suffix}"], ".2f") for key in
                              ("lesion_precision", "lesion_recall", "lesion_recall_small", "lesion_recall_large"))
        rows.append(f"| demo held-out lesion detection (LiTS: a reference lesion is found at IoU > 0.5, counts summed over "
                    f"the test volumes): precision / recall / recall of the {demo['lesions_small']['mean']:.0f} lesions under "
                    f"10 mm / of the {demo['lesions_large']['mean']:.0f} of 10 mm or more (seeds: mean, range) | "
                    f"{detection()} | — | |")
        rows.append(f"| the same with the default minimum lesion size (10 mm³) | {detection('_default_postprocessing')} | | |")
    if "sizes" in data:
        rows.extend(_size_sweep_rows(data["sizes"]))
    names = {"1": "IRCAD patient 1", "7": "IRCAD patient 7", "totalseg": "TotalSegmentator crop (3 mm, model-made labels)"}
    for label, ablation in data.get("ablations", {}).items():
        stats = ablation["summary"]
        sets = " ".join(f"`--set {change}`" for change in ablation["set"])
        # The wall time a seed beside the figures: an ablation of the training budget is about both.
        wall = (" / wall time a seed (data cached)", f" / {spread(stats['minutes'], '.1f')} min") if "minutes" in stats else ("", "")
        rows.append(f"| the demo with {label} ({sets}), {_seeds(ablation['runs'])}: held-out liver Dice / tumour Dice "
                    f"per case / tumour Dice global{wall[0]} | {spread(stats['liver_dice'])} / {spread(stats['tumor_dice'])} / "
                    f"{spread(stats['tumor_dice_global'])}{wall[1]} | | |")
        if "unseen_tumor_dice" in stats:
            rows.append(f"| the demo with {label}: on the same unseen phantom cases, liver Dice / tumour Dice per case / "
                        f"tumour Dice global | {spread(stats['unseen_liver_dice'])} / {spread(stats['unseen_tumor_dice'])} / "
                        f"{spread(stats['unseen_tumor_dice_global'])} | | |")
        if "lesion_recall" in stats:  # ablations measured since lesion detection was recorded
            rows.append(f"| the demo with {label}: held-out lesion detection, precision / recall / recall under 10 mm / "
                        f"of 10 mm or more | " + " / ".join(spread(stats[key], ".2f") for key in (
                            "lesion_precision", "lesion_recall", "lesion_recall_small", "lesion_recall_large")) + " | | |")
        if "per_case" in ablation.get("sim2real", {}):
            real = ablation["sim2real"]
            scans = " / ".join(f"{stats['liver_dice_mean']:.3f}" for stats in real["per_case"].values())
            tumours = _mean_tumour_by_case(real)
            rows.append(f"| the demo with {label}: sim-to-real liver Dice, {' / '.join(names.get(c, c) for c in real['per_case'])} "
                        f"({'one model' if len(real.get('models', ())) == 1 else 'mean over models'}){'; tumour Dice, ' + ' / '.join(names.get(c, c) for c in tumours) if tumours else ''} | {scans}"
                        f"{'; ' + ' / '.join(format(v, '.3f') for v in tumours.values()) if tumours else ''} | | |")
    for case, stats in per_case.items():
        rows.append(
            f"| sim-to-real liver Dice, {names.get(case, case)} (models: mean, range) | {stats['liver_dice_mean']:.3f} "
            f"({stats['liver_dice_min']:.3f} – {stats['liver_dice_max']:.3f}) | ≥ {goal:.2f} | {_mark(stats['liver_dice_mean'] >= goal)} |"
        )
    for case, scores in sim.get("ensemble", {}).items():
        rows.append(
            f"| sim-to-real liver Dice, {names.get(case, case)}: the {len(sim['models'])} models as one ensemble "
            f"(`predict --model` repeated) | {scores['liver_dice']:.3f} | ≥ {goal:.2f} | {_mark(scores['liver_dice'] >= goal)} |"
        )
    adjacent = sim.get("adjacent_context") or {}
    if adjacent:
        livers = " / ".join(f"{stats['liver_dice_mean']:.3f}" for stats in adjacent.values())
        tumours = {case: stats["tumor_dice_mean"] for case, stats in adjacent.items() if stats["tumor_dice_mean"] is not None}
        rows.append(f"| sim-to-real, the same models taking adjacent context slices (as before `preprocessing.context_mm`): "
                    f"liver Dice, {' / '.join(names.get(c, c) for c in adjacent)} (mean over models)"
                    f"{'; tumour Dice, ' + ' / '.join(names.get(c, c) for c in tumours) if tumours else ''} | {livers}"
                    f"{'; ' + ' / '.join(format(v, '.3f') for v in tumours.values()) if tumours else ''} | | |")
    irc = [case for case in tumour if case in ("1", "7")]
    if irc:
        values = " / ".join(f"{tumour[c]:.3f}" for c in irc)
        rows.append(f"| sim-to-real tumour Dice, IRCAD patient {' / '.join(irc)} (mean over models) | {values} | — | |")
    goals = lopo["goal"]
    patients = lopo["per_patient"]
    label = " / ".join(str(p["held_out_patient"]) for p in patients)
    livers = " / ".join(format(p["liver_dice"], ".3f") for p in patients)
    tumours = " / ".join(format(p["tumor_dice"], ".3f") for p in patients)
    rows += [
        f"| leave one patient out: liver Dice, patient {label} | {livers} | "
        f"≥ {goals['liver_dice']:.2f} each | {_mark(all(p['liver_dice'] >= goals['liver_dice'] for p in patients))} |",
        f"| leave one patient out: tumour Dice, patient {label} | {tumours} | "
        f"≥ {goals['tumor_dice']:.2f} | {_mark(all(p['tumor_dice'] >= goals['tumor_dice'] for p in patients))} |",
        f"| leave one patient out: wall time, both folds (data, training, whole-volume prediction, LiTS report) | "
        f"{lopo['minutes']:.1f} min | — | |",
    ]
    rows += _lopo_starts_rows(lopo, data.get("lopo_starts", {}))
    for label, ablation in data.get("lopo_ablations", {}).items():
        sets = " ".join(f"`--set {change}`" for change in ablation["set"])
        held_out = ablation["per_patient"]
        rows.append(f"| leave one patient out with {label} ({sets}): liver Dice / tumour Dice, patient "
                    f"{' / '.join(str(p['held_out_patient']) for p in held_out)} | "
                    f"{' / '.join(format(p['liver_dice'], '.3f') for p in held_out)}; "
                    f"{' / '.join(format(p['tumor_dice'], '.3f') for p in held_out)} ({ablation['minutes']:.1f} min) | | |")
    parts = {**data, **{f"ablation '{label}'": ablation for label, ablation in data.get("ablations", {}).items()},
             **{f"lopo from demo seed {seed}": start for seed, start in data.get("lopo_starts", {}).items()},
             **{f"lopo ablation '{label}'": ablation for label, ablation in data.get("lopo_ablations", {}).items()}}
    return "\n".join([*rows, "", _parts_machine_line(parts, ("fresh", "demo", *(p for p in parts if p.startswith("ablation '")),
                                                            "sim2real", "lopo", *(p for p in parts if p.startswith("lopo from")),
                                                            *(p for p in parts if p.startswith("lopo ablation '"))))])


def _lopo_starts_rows(lopo: dict, starts: dict) -> list[str]:
    """Leave one patient out from every demo model (``lopo`` from seed 0, ``lopo_starts`` from the
    others): each patient's Dice as a mean and range over the starting models, and how many of
    them meet each goal."""
    import numpy as np

    if not starts:
        return []
    runs = [lopo, *starts.values()]
    # lopo starts from the first --seeds model, recorded as its run folder (demo-seed<N>)
    seeds = ", ".join([Path(lopo["init_from"]).parent.parent.name.removeprefix("demo-seed"), *starts])
    patients = [str(p["held_out_patient"]) for p in lopo["per_patient"]]
    rows = []
    for key, name in (("liver_dice", "liver"), ("tumor_dice", "tumour")):
        goal = lopo["goal"][key]
        cells = []
        for patient in patients:
            values = [p[key] for run in runs for p in run["per_patient"] if str(p["held_out_patient"]) == patient]
            cells.append(f"{np.mean(values):.3f} ({min(values):.3f} – {max(values):.3f}; {sum(v >= goal for v in values)} "
                         f"of {len(values)} ≥ {goal:.2f})")
        rows.append(f"| leave one patient out from each demo model (seeds {seeds}; `bench_real.py lopo lopo-starts`): "
                    f"{name} Dice, patient {' / '.join(patients)} (mean, range) | {' / '.join(cells)} | — | |")
    return rows


def _size_sweep_rows(sweep: dict) -> list[str]:
    """Rows of ``bench_real.py sizes``: each minimum lesion size on the same predictions."""
    def name(diameter: float) -> str:
        return "10 mm³" if diameter == 0 else f"{diameter:g} mm"

    test, unseen = sweep["test"]["mean"], sweep["unseen"]["mean"]
    seeds = f"seeds {sweep['seeds'][0]}–{sweep['seeds'][-1]}" if len(sweep["seeds"]) > 1 else f"seed {sweep['seeds'][0]}"
    dice = " · ".join(f"{name(a['diameter_mm'])} {a['tumor_dice']:.3f} / {b['tumor_dice']:.3f}" for a, b in zip(test, unseen))
    lits = " · ".join(f"{name(a['diameter_mm'])} {a['precision']:.2f} / {a['recall']:.2f}" for a in test)
    found = " · ".join(f"{name(a['diameter_mm'])} {a['found_any_10_20']:.1f} / {a['found_any_20_up']:.1f}" for a in test)
    return [
        f"| each minimum lesion size on the same predictions of the demo models ({seeds}, `bench_real.py sizes`; 10 mm³ is "
        f"the default rule, the demo chooses among 6 – 15 mm): tumour Dice per case, held-out / {sweep['unseen_phantom']['cases']} "
        f"unseen phantom cases (mean over models) | {dice} | | |",
        f"| the same, held-out: LiTS lesion precision / recall (IoU > 0.5) | {lits} | | |",
        f"| the same, held-out: lesions touched by the prediction, of the {test[0]['lesions_10_20']:.0f} of 10 – 20 mm / "
        f"the {test[0]['lesions_20_up']:.0f} of 20 mm or more (mean over models) | {found} | | |",
    ]


def _seeds(runs: list[dict]) -> str:
    """``"seeds 0–2"``, ``"seeds 0, 2"`` or ``"seed 0"``: the seeds of an ablation's runs.

    >>> _seeds([{"seed": 0}, {"seed": 1}, {"seed": 2}]), _seeds([{"seed": 0}, {"seed": 2}]), _seeds([{"seed": 1}])
    ('seeds 0–2', 'seeds 0, 2', 'seed 1')
    """
    seeds = sorted(int(run.get("seed", i)) for i, run in enumerate(runs))  # older JSON: seeds 0, 1, ...
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def _mean_tumour_by_case(sim2real: dict) -> dict[str, float]:
    """Sim-to-real tumour Dice per scan, the mean over the single models (scans with tumour labels only)."""
    values: dict[str, list[float]] = {}
    for entry in sim2real["cases"]:
        single = not entry["model"].startswith("ensemble") and not entry["model"].endswith(" (adjacent slices)")
        if single and entry["tumor_dice"] is not None:
            values.setdefault(str(entry["case"]), []).append(entry["tumor_dice"])
    return {case: sum(v) / len(v) for case, v in values.items()}


def _parts_machine_line(data: dict, parts: Sequence[str]) -> str:
    """One machine line, or one per machine when the parts were measured on different ones.

    A part records its own ``machine`` (parts are rerun separately); older JSON has only the
    file's, which then stands for every part.
    """
    lines: dict[str, list[str]] = {}
    for part in parts:
        if part in data:
            line = _machine_line({"machine": data[part].get("machine", data.get("machine", {}))})
            lines.setdefault(line, []).append(part)
    if len(lines) <= 1:
        return next(iter(lines), _machine_line(data))
    return "  \n".join(f"{', '.join(names)}: {line}" for line, names in lines.items())


def render_fuzz(data: dict) -> str:
    counts = data["outcomes"]
    rows = [
        "| inputs tried | results | clean refusals | crashes (goal 0) | hangs (goal 0) | memory exhaustion (goal 0) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {data['inputs_tried']} | {counts['result']} | {counts['refusal']} | **{counts['crash']}** {_mark(counts['crash'] == 0)} | "
        f"**{counts['hang']}** {_mark(counts['hang'] == 0)} | **{counts['memory']}** {_mark(counts['memory'] == 0)} |",
    ]
    head = (f"{data['mutations']} broken inputs (a small LiTS case's NIfTI header fields, data and bytes; the shared "
            "DICOM series' tags and pixel data, for `predict`) through "
            f"{' and '.join(f'`{c}`' for c in data['commands'])}, each in its own process with a time and memory limit.")
    speed = []
    for command in data["commands"]:
        seconds = sorted(r["seconds"] for r in data.get("rows", []) if r["command"] == command and r["outcome"] == "refusal")
        if seconds:
            speed.append(f"`{command}` {statistics.median(seconds):.1f} s (slowest {seconds[-1]:.1f} s)")
    tail = [f"Time to a refusal, median: {', '.join(speed)}, the process's start included."] if speed else []
    return "\n".join([head, "", *rows, "", *tail, *([""] if tail else []), _machine_line(data)])


def render_kill_resume(data: dict) -> str:
    rows = ["| command | kills | finished before the kill | bytes lost (goal 0) | errors after rerun (goal 0) | check |",
            "| --- | ---: | ---: | ---: | ---: | --- |"]
    checks = {
        "prepare": "shards and manifest byte-identical to an uninterrupted run",
        "fit": "every epoch once in history.csv, learning rates as uninterrupted, complete.json",
        "export": "no all-digit version folder ever incomplete",
    }
    for row in data["rows"]:
        lost = row["bytes_lost"]
        rows.append(f"| `{row['command']}` | {row['kills']} | {row['finished_early']} | **{lost}** {_mark(lost == 0)} | "
                    f"{0 if row['error'] is None else 1} {_mark(row['error'] is None)} | {checks.get(row['command'], '')} |")
    head = f"Each command SIGKILLed {data['kills_per_command']} times at random points (seed {data['seed']}), rerun with `--resume`."
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def render_compare_phantom(data: dict) -> str:
    rows = [
        "| model | parameters | GFLOPs / slice | training slices/s | liver Dice (range over seeds) | tumour Dice (range) | tumour p vs unet |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for row in data["rows"]:
        rows.append(
            f"| {row['model']} | {row['parameters']:,} | {_n(row.get('gflops'))} | {_n(row.get('train_slices_per_s'), '.1f')} | "
            f"{_n(row['liver_dice'], '.3f')} ({_n(row['liver_dice_min'], '.3f')} – {_n(row['liver_dice_max'], '.3f')}) | "
            f"{_n(row['tumor_dice'], '.3f')} ({_n(row['tumor_dice_min'], '.3f')} – {_n(row['tumor_dice_max'], '.3f')}) | "
            f"{_n(row.get('tumor_p_vs_first'), '.3f')} |"
        )
    seeds = len(data["rows"][0]["seeds"]) if data["rows"] else 0
    head = (f"`{data['command']}`: {data['budget']}, {seeds} seeds per model, scored on the same "
            f"{len(data['cases'])} held-out phantom volumes (whole volumes, LiTS scoring, mean per case); "
            f"slices/s on in-memory batches of {data['speed_batch']} at {data['input_shape']}, timed one model after "
            f"another ({data['timed_on']}).")
    return "\n".join([head, "", *rows, "", _machine_line(data)])


def _engine_rows(runs: dict, minutes: bool, volume_ratio: bool = False) -> list[str]:
    """The prepare table of the scale benchmarks: local and Beam engines, 1 and 2 workers each."""
    rows = [
        f"| engine | workers | wall {'min' if minutes else 's'} | slices/s | × local, same workers (goal ≤ 1.5) | "
        f"peak RSS per worker |{' RSS / largest volume |' if volume_ratio else ''}",
        f"| --- | ---: | ---: | ---: | ---: | ---: |{' ---: |' if volume_ratio else ''}",
    ]
    for engine, label in (("local", "local (processes)"), ("beam", "Beam DirectRunner")):
        for workers in (1, 2):
            run = runs[f"{engine}_{workers}"]
            ratio = f"**{run['x_local']:.2f}** {_mark(run['x_local'] <= 1.5)}" if engine == "beam" else "1.00"
            wall = run["wall_s"] / 60 if minutes else run["wall_s"]
            extra = f" {run['rss_over_largest_volume']:.2f} |" if volume_ratio else ""
            rows.append(f"| {label} | {workers} | {wall:.1f} | {run['slices_per_s']:.0f} | {ratio} | "
                        f"{run['worker_peak_rss_mb']:.0f} MB |{extra}")
    return rows


def render_scale(data: dict) -> str:
    rows = _engine_rows({key: data[key] for key in ("local_1", "local_2", "beam_1", "beam_2")}, minutes=False)
    projection = data["lits_projection_s"]
    fit = data["fit"]
    head = (f"{data['cases']} phantom volumes of {data['size']}×{data['size']}×{'–'.join(map(str, data['slices']))} → "
            f"{data['image_size']} px; the Beam and local outputs are byte-identical: "
            f"{'yes' if data['byte_identical'] else '**no**'}.")
    lits = (f"LiTS (131 volumes, 58,638 slices) at these phantom rates and the measured 1 → 2 worker efficiency "
            f"(local {data['local_scaling_efficiency_2']:.2f}, Beam {data['beam_scaling_efficiency_2']:.2f}), on Beam: "
            + ", ".join(f"{n} worker{'s' if n > 1 else ''} {projection[f'beam_{n}'] / 60:.1f} min" for n in (1, 8, 32))
            + ". A projection, not a run: real scans compress less well than the phantom (slower to read), and a "
            "cluster's storage sets its own pace.")
    fit_line = (f"`fit`, two workers on loopback against one process ({fit['size']} px U-Net, batch {fit['per_replica_batch']} per replica): "
                f"{fit['two_workers_slices_per_s']:.0f} against {fit['one_worker_slices_per_s']:.0f} slices/s "
                f"(**{fit['two_over_one']:.2f}×**; the two workers share this machine's 2 cores).")
    return "\n".join([head, "", *rows, "", lits, "", fit_line, "", _machine_line(data)])


def render_lits_scale(data: dict) -> str:
    made, runs = data["set"], data["runs"]
    rows = _engine_rows(runs, minutes=True, volume_ratio=True)
    head = (f"`python -m keras_livseg.phantom --lits-sized`: {made['volumes']} volumes of {made['size']}×{made['size']}, "
            f"{made['slices']:,} slices ({made['min_slices']}–{made['max_slices']} a volume, LiTS's total and range), "
            f"{made['gzip_gb']:.1f} GB gzipped → {data['image_size']} px shards ({runs['local_1']['out_gb']:.1f} GB, "
            f"{runs['local_1']['files']} files); all four outputs byte-identical: "
            f"{'yes' if data['byte_identical'] else '**no**'}.")
    projection = data["projection_s"]
    lits = (f"Measured 1 → 2 worker efficiency: local {data['local_scaling_efficiency_2']:.2f}, Beam "
            f"{data['beam_scaling_efficiency_2']:.2f}; at that efficiency Beam would take "
            f"{projection['beam_8'] / 60:.1f} min on 8 workers and {projection['beam_32'] / 60:.1f} min on 32 "
            "(a projection: a cluster's storage sets its own pace).")
    return "\n".join([head, "", *rows, "", lits, "", _machine_line(data)])


RENDERERS: dict[str, Callable[[dict], str]] = {
    "prepare": render_prepare,
    "scale": render_scale,
    "lits_scale": render_lits_scale,
    "pipeline": render_pipeline,
    "models": render_models,
    "memory": render_memory,
    "predict": render_predict,
    "predict_trained": render_predict,
    "predict_long_trained": render_predict,
    "predict_long": render_predict,
    "fit_loop": render_fit_loop,
    "fuzz": render_fuzz,
    "kill_resume": render_kill_resume,
    "real_ct": render_real_ct,
    "compare_phantom": render_compare_phantom,
    "run_all": render_run_all,
}


def _section(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.S)


def render_all(text: str, results: Path) -> tuple[str, list[str]]:
    """``text`` with every marked table whose JSON exists rewritten; the names changed."""
    changed = []
    for name, render in RENDERERS.items():
        path = results / f"{name}.json"
        pattern = _section(name)
        if not path.is_file() or not pattern.search(text):
            continue
        table = render(json.loads(path.read_text())).rstrip() + "\n"
        new = pattern.sub(lambda m: m.group(1) + table + m.group(3), text, count=1)
        if new != text:
            changed.append(name)
        text = new
    return text, changed


def update_readme(readme: Path = README, results: Path | None = None) -> list[str]:
    """Rewrite the README's marked tables from ``results`` (default: :func:`results_dir`)."""
    text, changed = render_all(readme.read_text(), results or results_dir())
    if changed:
        readme.write_text(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare: exit 1 when a table differs from its JSON")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args(argv)
    if args.check:
        _, changed = render_all(args.readme.read_text(), args.results or results_dir())
        print(f"out of date: {', '.join(changed)}" if changed else "README tables match the JSON")
        return 1 if changed else 0
    changed = update_readme(args.readme, args.results)
    print(f"rewrote: {', '.join(changed)}" if changed else "README tables already match the JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
