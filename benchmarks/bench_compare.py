"""Every model of the registry in the same budget on the phantom (issue 9): one ``compare`` run.

Runs ``python -m keras_livseg.compare`` on the demo recipe (pipelines/phantom_demo.toml, its
phantom pinned at 32 cases; 128x128 2.5D slices at 3 mm per pixel) for every model with SEEDS seeds and
EPOCHS epochs of 80 steps, the ResNet encoders at ResNet-18 so that the 2-core budget holds;
finished runs in ``runs/compare-phantom`` are reused. Then prints the table and writes
``benchmarks/results/compare_phantom.json``: per model parameters, GFLOPs, training and
inference slices/s, held-out liver and tumour Dice (mean and range over seeds) and the paired
test against the U-Net. The full report with the papers' tables and figures is
``runs/compare-phantom/report.md``.

    python benchmarks/bench_compare.py [--seeds 2] [--epochs 5] [--models unet,tam_unet]
    python benchmarks/bench_compare.py --report-only   # after the same compare command ran by hand
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "compare-phantom"
#: The figures in the README were measured on the demo phantom of 32 cases (the demo has 96 since) and
#: whole slices, 80 steps an epoch (the demo trains on 180 steps of patches since): pinned, so that a
#: rerun reuses or reproduces those runs.
SMALL_ENCODERS = ["--set", "data.phantom_cases=32", "--set", "training.crop_size=0", "--set", "training.steps_per_epoch=80",
                  "--set", "model.linknet.encoder=resnet18",
                  "--set", "model.pspnet.encoder=resnet18", "--set", "model.manet.encoder=resnet18"]


def summarize(report: dict) -> list[dict]:
    rows = []
    for model in report["models"]:
        volume, spread = model["mean"]["volume"], model["spread"]["volume"]
        tests = model.get("paired_tests") or {}
        rows.append({
            "model": model["name"],
            "parameters": model["parameters"]["trainable"],
            "gflops": (model.get("flops") or 0) / 1e9 or None,
            "train_slices_per_s": (model.get("speed") or {}).get("train_slices_per_s"),
            "inference_slices_per_s": (model.get("speed") or {}).get("inference_slices_per_s"),
            "training_minutes": model.get("training_minutes"),
            "liver_dice": volume["liver"]["dice"], "liver_dice_min": spread["liver"]["dice"]["min"],
            "liver_dice_max": spread["liver"]["dice"]["max"],
            "tumor_dice": volume["tumor"]["dice"], "tumor_dice_min": spread["tumor"]["dice"]["min"],
            "tumor_dice_max": spread["tumor"]["dice"]["max"],
            "tumor_p_vs_first": (tests.get("tumor") or {}).get("p_value"),
            "liver_p_vs_first": (tests.get("liver") or {}).get("p_value"),
            "seeds": model["seeds"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--models", help="comma-separated (default: every registry model)")
    parser.add_argument("--report-only", action="store_true",
                        help="summarize the existing runs/compare-phantom/compare.json (written by the same command)")
    args = parser.parse_args()
    command = [sys.executable, "-m", "keras_livseg.compare", "--seeds", str(args.seeds), "--epochs", str(args.epochs),
               "--name", NAME, *SMALL_ENCODERS] + (["--models", args.models] if args.models else [])
    if not args.report_only:
        subprocess.run(command, cwd=ROOT, check=True)
    report = json.loads((ROOT / "runs" / NAME / "compare.json").read_text())
    rows = summarize(report)
    print(table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items() if k != "seeds"} for r in rows],
                ["model", "parameters", "gflops", "train_slices_per_s", "training_minutes", "liver_dice", "tumor_dice",
                 "tumor_p_vs_first"]))
    write_json("compare_phantom", {
        "command": " ".join(["python -m keras_livseg.compare"] + command[3:]),
        "recipe": report["recipe"], "budget": report["budget"], "cases": report["cases"], "split": report["split"],
        "input_shape": report["input_shape"], "speed_batch": report["speed_batch"], "timed_on": report["machine"],
        "rows": rows,
    })


if __name__ == "__main__":
    main()
