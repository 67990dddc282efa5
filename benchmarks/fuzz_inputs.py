"""Broken inputs against ``prepare`` and ``predict``: every one must end in a result or one clear line.

Each input is a small valid LiTS case (``volume-0.nii`` + ``segmentation-0.nii``), or for
``predict`` the shared 3-slice DICOM series (missing tags, mixed series, sizes that disagree,
truncated or missing pixel data, an emptied file), with one thing broken: header fields (zero, negative, NaN or huge pixdim, singular or disagreeing qform/sform,
4D, huge dims with tiny data, odd datatypes, zero or NaN scaling), the data (NaN, non-integer or
out-of-range labels, a label of another shape), or the bytes (truncated at many offsets, empty,
a ``.nii.gz`` that is not gzip, a gzip stream cut short). Each command runs in its own process
with a time limit and an address-space limit, and the outcome is classified:

- ``result``: exit 0 (the input was usable, e.g. a negative pixdim is only a flip);
- ``refusal``: non-zero exit with an ``error:`` line and no traceback;
- ``crash``: a traceback, or a non-zero exit without the one line (goal 0);
- ``hang``: the time limit (goal 0); ``memory``: killed at the address-space limit (goal 0).

    python benchmarks/fuzz_inputs.py                  # every mutation, prepare and predict
    python benchmarks/fuzz_inputs.py --commands prepare --limit 10
"""

from __future__ import annotations

import argparse
import gzip
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

SHAPE = (24, 24, 6)
MEMORY_LIMIT = 6 * 2**30  # bytes of address space per command: a huge header must not exhaust the machine
TIMEOUT_S = 120


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    hu = rng.normal(-800, 50, SHAPE).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    labels[6:18, 6:18, 1:5] = 1
    labels[10:13, 10:13, 2:4] = 2
    hu[labels == 1] = 60
    hu[labels == 2] = 20
    return hu, labels


AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])


def _save(image: nib.Nifti1Image, path: Path) -> None:
    nib.save(image, str(path))


def _header_edit(**fields) -> Callable[[Path], None]:
    """Rewrite header fields of the written volume in place (bytes, not nibabel's checks)."""
    def edit(folder: Path) -> None:
        path = folder / "volume-0.nii"
        image = nib.load(str(path))
        header = image.header.copy()
        for key, value in fields.items():
            header[key] = value
        raw = path.read_bytes()
        path.write_bytes(header.binaryblock + raw[348:])
    return edit


def _bytes_edit(change: Callable[[bytes], bytes], name: str = "volume-0.nii") -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_bytes(change(path.read_bytes()))
    return edit


def _replace_volume(make: Callable[[np.ndarray], nib.Nifti1Image]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        hu, _ = _volume()
        _save(make(hu), folder / "volume-0.nii")
    return edit


def _replace_labels(make: Callable[[np.ndarray], nib.Nifti1Image]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        _, labels = _volume()
        _save(make(labels), folder / "segmentation-0.nii")
    return edit


def _gz(folder: Path, truncate: int | None = None, not_gzip: bool = False) -> None:
    raw = (folder / "volume-0.nii").read_bytes()
    (folder / "volume-0.nii").unlink()
    data = raw if not_gzip else gzip.compress(raw)
    (folder / "volume-0.nii.gz").write_bytes(data[:truncate] if truncate else data)


def _disagreeing_forms(hu: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(hu, AFFINE)
    image.header.set_qform(np.diag([-3.0, -3.0, 9.0, 1.0]), code=1)
    image.header.set_sform(AFFINE, code=1)
    return image


def mutations() -> dict[str, Callable[[Path], None]]:
    """Name → an edit of a valid case folder."""
    size = SHAPE[0] * SHAPE[1] * SHAPE[2] * 2 + 352
    found: dict[str, Callable[[Path], None]] = {
        "pixdim zero": _header_edit(pixdim=[1, 0.0, 0.8, 2.5, 1, 1, 1, 1]),
        "pixdim negative": _header_edit(pixdim=[1, -0.8, 0.8, 2.5, 1, 1, 1, 1]),
        "pixdim NaN": _header_edit(pixdim=[1, np.nan, 0.8, 2.5, 1, 1, 1, 1]),
        "pixdim huge": _header_edit(pixdim=[1, 1e30, 0.8, 2.5, 1, 1, 1, 1]),
        "sform singular, no qform": _header_edit(sform_code=1, qform_code=0, srow_x=[0, 0, 0, 0],
                                                 srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0]),
        "qform and sform disagree": _replace_volume(_disagreeing_forms),
        "4D volume": _replace_volume(lambda hu: nib.Nifti1Image(np.stack([hu, hu], -1), AFFINE)),
        "2D volume": _replace_volume(lambda hu: nib.Nifti1Image(hu[:, :, 0], AFFINE)),
        "huge dims, tiny data": _header_edit(dim=[3, 32000, 32000, 32000, 1, 1, 1, 1]),
        "large dims, tiny data": _header_edit(dim=[3, 1024, 1024, 900, 1, 1, 1, 1]),
        "dim[0] zero": _header_edit(dim=[0, *SHAPE, 1, 1, 1, 1]),
        "dim[0] eight": _header_edit(dim=[8, *SHAPE, 1, 1, 1, 1]),
        "negative dim": _header_edit(dim=[3, -24, 24, 6, 1, 1, 1, 1]),
        "datatype complex64": _replace_volume(lambda hu: nib.Nifti1Image(hu.astype(np.complex64), AFFINE)),
        "datatype float64 with NaN": _replace_volume(
            lambda hu: nib.Nifti1Image(np.where(hu > 0, np.nan, hu).astype(np.float64), AFFINE)),
        "datatype code unknown": _header_edit(datatype=9999),
        "scl_slope zero": _header_edit(scl_slope=0.0, scl_inter=0.0),
        "scl_slope NaN": _header_edit(scl_slope=np.nan, scl_inter=5.0),
        "scl_slope huge": _header_edit(scl_slope=1e38, scl_inter=0.0),
        "intensities not HU (0..1)": _replace_volume(lambda hu: nib.Nifti1Image((hu > 0).astype(np.float32), AFFINE)),
        "labels non-integer": _replace_labels(lambda lab: nib.Nifti1Image(lab.astype(np.float32) * 0.5, AFFINE)),
        "labels out of range": _replace_labels(lambda lab: nib.Nifti1Image(lab * 7, AFFINE)),
        "labels other shape": _replace_labels(lambda lab: nib.Nifti1Image(lab[:, :, :4], AFFINE)),
        "labels other affine": _replace_labels(lambda lab: nib.Nifti1Image(lab, np.diag([-1.0, -1.0, 2.5, 1.0]))),
        "empty file": _bytes_edit(lambda raw: b""),
        "magic bytes wrong": _bytes_edit(lambda raw: raw[:344] + b"xyz\x00" + raw[348:]),
        "sizeof_hdr wrong": _bytes_edit(lambda raw: (999).to_bytes(4, "little") + raw[4:]),
        "vox_offset beyond the file": _header_edit(vox_offset=10_000_000.0),
        ".nii.gz that is not gzip": lambda folder: _gz(folder, not_gzip=True),
        "gzip stream cut short": lambda folder: _gz(folder, truncate=400),
        "label file truncated": _bytes_edit(lambda raw: raw[:500], name="segmentation-0.nii"),
    }
    for cut in (1, 100, 347, 348, 352, 353, size // 2, size - 1):
        found[f"truncated at byte {cut}"] = _bytes_edit(lambda raw, cut=cut: raw[:cut])
    return found


SHARED_SERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "dcmqi-ct-3slice" / "dicom"


def _dicom_edit(change: Callable[[object, int], None] | None = None, raw: Callable[[bytes, int], bytes] | None = None
                ) -> Callable[[Path], None]:
    """Copy the shared 3-slice CT series into ``folder/dicom`` with ``change(dataset, index)`` or ``raw(bytes, index)``."""
    def edit(folder: Path) -> None:
        import pydicom

        target = folder / "dicom"
        target.mkdir()
        for index, name in enumerate(["01.dcm", "02.dcm", "03.dcm"]):
            dataset = pydicom.dcmread(str(SHARED_SERIES / name))
            if change is not None:
                change(dataset, index)
            dataset.save_as(str(target / name))
            if raw is not None:
                (target / name).write_bytes(raw((target / name).read_bytes(), index))
    return edit


def _drop(keyword: str, only: int | None = None) -> Callable[[object, int], None]:
    def change(dataset, index):
        if (only is None or index == only) and keyword in dataset:
            delattr(dataset, keyword)
    return change


def dicom_mutations() -> dict[str, Callable[[Path], None]]:
    """Broken variants of the shared DICOM series (predict only reads DICOM)."""
    def other_series(dataset, index):
        if index == 2:
            dataset.SeriesInstanceUID += ".7"

    def other_size(dataset, index):
        if index == 1:
            dataset.Rows = 256

    return {
        "DICOM: no ImagePositionPatient": _dicom_edit(_drop("ImagePositionPatient", only=1)),
        "DICOM: no ImageOrientationPatient": _dicom_edit(_drop("ImageOrientationPatient")),
        "DICOM: no PixelSpacing": _dicom_edit(_drop("PixelSpacing")),
        "DICOM: two series mixed": _dicom_edit(other_series),
        "DICOM: Rows disagree with the pixel data": _dicom_edit(other_size),
        "DICOM: pixel data cut short": _dicom_edit(raw=lambda data, index: data[:-5000] if index == 0 else data),
        "DICOM: a file emptied": _dicom_edit(raw=lambda data, index: b"" if index == 1 else data),
        "DICOM: no PixelData": _dicom_edit(_drop("PixelData")),
    }


def make_case(folder: Path, mutation: Callable[[Path], None]) -> Path:
    """A one-case LiTS folder with ``mutation`` applied."""
    folder.mkdir(parents=True)
    hu, labels = _volume()
    _save(nib.Nifti1Image(hu, AFFINE), folder / "volume-0.nii")
    _save(nib.Nifti1Image(labels, AFFINE), folder / "segmentation-0.nii")
    mutation(folder)
    return folder


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny U-Net checkpoint with its preprocessing.json, for predict."""
    code = (
        "import sys; from keras_livseg.models import build_model; "
        "from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json; "
        "build_model('unet', input_shape=(32, 32, 1), filters=4, depth=2).save(sys.argv[1] + '/model.keras'); "
        "write_preprocessing_json(sys.argv[1] + '/preprocessing.json', Preprocessing(image_size=(32, 32), mean=60.0, std=40.0))"
    )
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True)
    return folder / "model.keras"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def classify(argv: list[str], timeout: float = TIMEOUT_S) -> tuple[str, str]:
    """Run one command; ``(outcome, last stderr line)``."""
    try:  # the commands quiet TensorFlow themselves (keras_livseg.cli)
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        return "hang", f"no answer within {timeout:.0f} s"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback (most recent call last)" in done.stderr:
        memory = "MemoryError" in done.stderr or "std::bad_alloc" in done.stderr
        return ("memory" if memory else "crash"), last
    if done.returncode == 0:
        return "result", last
    if done.returncode < 0:
        return ("memory" if done.returncode == -9 else "crash"), f"killed by signal {-done.returncode}"
    if ": error: " in done.stderr:
        return "refusal", next(line for line in lines if ": error: " in line)
    return "crash", last or f"exit {done.returncode} without a message"


def run(names: list[str] | None, commands: list[str], work: Path, progress: bool = True) -> list[dict]:
    """Try each mutation with each command; one row per (mutation, command)."""
    table_rows = []
    every = {**mutations(), **(dicom_mutations() if SHARED_SERIES.is_dir() else {})}
    chosen = {k: v for k, v in every.items() if names is None or k in names}
    checkpoint = tiny_checkpoint(work / "model") if "predict" in commands else None
    for index, (name, mutation) in enumerate(chosen.items()):
        case = make_case(work / f"case-{index}", mutation)
        for command in commands:
            if name.startswith("DICOM") and command != "predict":
                continue  # only predict reads DICOM
            if command == "prepare":
                argv = ["-m", "keras_livseg.prepare", "--src", str(case), "--out", str(work / f"shards-{index}"),
                        "--image-size", "32", "--workers", "1", "--split", "1,0,0", "--no-progress"]
            else:
                volume = case / "dicom" if (case / "dicom").is_dir() else next(case.glob("volume-0.nii*"))
                argv = ["-m", "keras_livseg.predict", "--model", str(checkpoint), str(volume),
                        "--out", str(work / f"pred-{index}"), "--no-progress"]
            started = time.perf_counter()
            outcome, line = classify(argv)
            row = {"input": name, "command": command, "outcome": outcome, "seconds": round(time.perf_counter() - started, 1),
                   "message": line[:200]}
            table_rows.append(row)
            if progress:
                print(f"[{index + 1}/{len(chosen)}] {command:8s} {outcome:8s} {name}: {line[:110]}", file=sys.stderr, flush=True)
    return table_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", nargs="+", choices=("prepare", "predict"), default=["prepare", "predict"])
    parser.add_argument("--limit", type=int, help="only the first N mutations")
    args = parser.parse_args(argv)
    names = list(mutations())[: args.limit] if args.limit else None
    with tempfile.TemporaryDirectory() as work:
        rows = run(names, args.commands, Path(work))
    counts = {outcome: sum(r["outcome"] == outcome for r in rows) for outcome in ("result", "refusal", "crash", "hang", "memory")}
    print(table(rows, ["input", "command", "outcome", "seconds", "message"]))
    print("\n" + table([{"inputs tried": len(rows), **counts}], ["inputs tried", *counts]))
    path = write_json("fuzz", {"commands": args.commands, "mutations": len({r["input"] for r in rows}),
                               "inputs_tried": len(rows), "outcomes": counts, "rows": rows,
                               "goals": {"crash": 0, "hang": 0, "memory": 0}})
    print(f"\ngoals: crashes 0, hangs 0, memory 0 -> {path}")
    return 1 if counts["crash"] or counts["hang"] or counts["memory"] else 0


if __name__ == "__main__":
    sys.exit(main())
