"""How close the CT phantom is to real CT: liver HU, liver size and extent, body size, coverage.

Generates a few phantom cases and loads the real 3D-IRCADb scans (portal-phase contrast CT,
expert liver labels) from ``../shared/data/real/ircadb`` (relative to the repository root),
then prints one table row per case and per group (phantom mean, real mean) and writes
``benchmarks/results/phantom_realism.json``. Without the real data the phantom side is still
measured and a message says why the real side is missing.

Measured per case: liver HU mean/std (label 1, tumour excluded, noise included), liver volume
(ml, label >= 1), liver extent in x/y/z (mm, bounding box), body width (mm, median over
slices of the largest connected region above -400 HU, left-right), body depth (front-back),
the fraction of slices that contain liver, and the share of the liver that lies left of the
body's midline (each slice's body centre; the left lobe's reach). Phantom cases also report their contrast phase.

    python benchmarks/phantom_realism.py [--cases 8] [--size 256] [--slices 64:96]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
IRCAD_CASES = (1, 7)
COLUMNS = [
    "case", "phase", "liver_hu_mean", "liver_hu_std", "liver_ml", "extent_x_mm", "extent_y_mm",
    "extent_z_mm", "body_width_mm", "body_depth_mm", "liver_slice_fraction", "liver_left_share", "spacing_mm",
]
NUMERIC = COLUMNS[2:-1]


def measure(volume: np.ndarray, labels: np.ndarray, spacing) -> dict:
    """The realism statistics of one volume (``[i, j, k]``, HU) and its 0/1/2 labels."""
    dx, dy, dz = (float(s) for s in spacing)
    liver = labels >= 1
    parenchyma = volume[labels == 1].astype(np.float64)
    idx = np.argwhere(liver)
    extent = (idx.max(0) - idx.min(0) + 1) * np.array([dx, dy, dz]) if idx.size else np.zeros(3)
    widths, depths = [], []
    left = 0
    liver_slices = set(np.flatnonzero(liver.any(axis=(0, 1))).tolist())
    sampled = set(range(0, volume.shape[2], max(1, volume.shape[2] // 24)))
    for k in sorted(sampled | liver_slices):
        body = volume[:, :, k] > -400
        components, count = ndimage.label(body)
        if not count:
            continue
        sizes = ndimage.sum(body, components, range(1, count + 1))
        largest = components == int(np.argmax(sizes)) + 1
        ii, jj = np.flatnonzero(largest.any(1)), np.flatnonzero(largest.any(0))
        if k in liver_slices:  # liver beyond the body's midline (i runs toward the patient's left)
            left += int(liver[int(np.ceil((ii[0] + ii[-1]) / 2)):, :, k].sum())
        if k in sampled:
            widths.append((ii[-1] - ii[0] + 1) * dx)
            depths.append((jj[-1] - jj[0] + 1) * dy)
    return {
        "liver_hu_mean": round(float(parenchyma.mean()), 1) if parenchyma.size else float("nan"),
        "liver_hu_std": round(float(parenchyma.std()), 1) if parenchyma.size else float("nan"),
        "liver_ml": round(float(liver.sum() * dx * dy * dz / 1000.0), 0),
        "extent_x_mm": round(float(extent[0]), 0),
        "extent_y_mm": round(float(extent[1]), 0),
        "extent_z_mm": round(float(extent[2]), 0),
        "body_width_mm": round(float(np.median(widths)), 0) if widths else float("nan"),
        "body_depth_mm": round(float(np.median(depths)), 0) if depths else float("nan"),
        "liver_slice_fraction": round(float(liver.any(axis=(0, 1)).mean()), 2),
        "liver_left_share": round(left / max(int(liver.sum()), 1), 3),
        "spacing_mm": "x".join(f"{s:.2f}" for s in (dx, dy, dz)),
    }


def summary(name: str, rows: list[dict]) -> dict:
    out = {"case": name, "phase": "", "spacing_mm": ""}
    for column in NUMERIC:
        values = [r[column] for r in rows if isinstance(r[column], (int, float))]
        digits = 3 if column == "liver_left_share" else 1  # a share: 0.1 would say nothing
        out[column] = round(float(np.mean(values)), digits) if values else float("nan")
    return out


def phantom_rows(cases: int, size: int, slices: tuple[int, int], seed: int) -> tuple[list[dict], float]:
    from keras_livseg.data.phantom import iter_phantom_cases

    rows, start = [], time.perf_counter()
    for index, case in iter_phantom_cases(cases, seed=seed, size=size, slices=slices):
        rows.append({"case": f"phantom-{index}", "phase": case.phase, **measure(case.volume_hu, case.labels, case.spacing)})
    return rows, (time.perf_counter() - start) / cases


def real_rows() -> tuple[list[dict], str | None]:
    folder = REAL / "ircadb"
    if not folder.is_dir():
        return [], f"real data not found at {folder}: the real side is skipped (phantom only)"
    import nibabel as nib

    rows = []
    for n in IRCAD_CASES:
        volume_path, label_path = folder / f"volume-{n}.nii.gz", folder / f"segmentation-{n}.nii.gz"
        if not (volume_path.is_file() and label_path.is_file()):
            continue
        image = nib.load(volume_path)
        volume = np.asanyarray(image.dataobj)
        labels = np.asanyarray(nib.load(label_path).dataobj)
        rows.append({"case": f"ircad-{n}", "phase": "portal (real)", **measure(volume, labels, image.header.get_zooms()[:3])})
    if not rows:
        return [], f"no IRCAD volumes in {folder}: the real side is skipped (phantom only)"
    return rows, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", default="64:96", help="MIN:MAX slice count of the phantom cases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lo, _, hi = args.slices.partition(":")
    slices = (int(lo), int(hi or lo))

    phantom, seconds = phantom_rows(args.cases, args.size, slices, args.seed)
    real, message = real_rows()
    rows = phantom + real + [summary("PHANTOM mean", phantom)]
    if real:
        rows.append(summary("REAL mean", real))
    print(table(rows, COLUMNS))
    print(f"\nphantom generation: {seconds:.2f} s per case at size {args.size}, {slices[0]}-{slices[1]} slices")
    if message:
        print(message)
    path = write_json(
        "phantom_realism",
        {
            "settings": {"cases": args.cases, "size": args.size, "slices": list(slices), "seed": args.seed},
            "seconds_per_case": round(seconds, 3),
            "phantom": phantom, "real": real, "real_skipped": message,
            "summary": {"phantom": summary("phantom", phantom), "real": summary("real", real) if real else None},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
