"""Shared helpers of the benchmark scripts: phantom data of realistic size, tables, JSON."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout without the package installed
    sys.path.append(str(ROOT))
import keras_livseg  # noqa: E402,F401  before any script imports TensorFlow: the package's oneDNN default
from keras_livseg.data.atomic import atomic_write_json, make_once  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("KERAS_LIVSEG_CACHE", ROOT / ".cache" / "keras_livseg"))


def phantom_volumes(cases: int, size: int = 512, slices: tuple[int, int] = (200, 300), seed: int = 7) -> Path:
    """A cached folder of LiTS-layout phantom volumes of realistic size.

    They are made in a child process. Linux carries a process's peak RSS into the children it
    starts (``subprocess`` spawns through ``vfork``: the child's ``ru_maxrss`` begins at the
    parent's high-water mark), so a benchmark that made hundreds of MB of volumes itself would
    report that much as the starting RSS of every process it then measures.
    """
    folder = DATA / f"bench-phantom-{cases}x{size}-{slices[0]}-{slices[1]}-s{seed}"
    code = ("import sys; from pathlib import Path; from keras_livseg.data.phantom import write_phantom_dataset; "
            "write_phantom_dataset(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), size=int(sys.argv[4]), "
            "slices=(int(sys.argv[5]), int(sys.argv[6])), overwrite=True)")
    make_once(folder, folder / "phantom.json", "the benchmark's phantom",  # two benchmarks started together make it once
              lambda: subprocess.run([sys.executable, "-c", code, str(folder), str(cases), str(seed), str(size),
                                      *map(str, slices)], check=True, cwd=ROOT))
    return folder


def step_times(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line([r.get(c, "") for c in columns]) for r in rows])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU features that change our figures several-fold: TensorFlow's and PyTorch's CPU kernels
#: take 512-bit paths with AVX-512, and bfloat16 is fast only with AVX-512 BF16 or AMX (on an
#: AVX2-only CPU a bfloat16 step ran ~7x slower than float32). "AMD EPYC" alone does not say which.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def _cpu_flags() -> list[str]:
    """The :data:`SPEED_FLAGS` this CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in SPEED_FLAGS if flag in present]
    except OSError:
        pass
    return []


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


LIBRARIES = ("keras_livseg", "tensorflow", "keras", "numpy", "scipy", "nibabel", "torch", "jax", "apache-beam")


def machine() -> dict:
    """What a figure was measured on, and when: date (UTC), CPU model, cores, load, OS, Python and library versions."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),  # UTC: which run of a script a figure is from
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpus": os.cpu_count(),
        "cores_usable": cores,
        "load_average_at_write": load,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": {name: v for name in LIBRARIES if (v := _version(name)) is not None},
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
    }


def results_dir() -> Path:
    """Where the JSON goes: ``$KERAS_LIVSEG_BENCH_RESULTS`` (the runner's test points it at a
    temporary folder) or ``benchmarks/results``, whose files back the README's figures."""
    return Path(os.environ.get("KERAS_LIVSEG_BENCH_RESULTS") or RESULTS)


def write_json(name: str, payload: dict, results: Path | None = None) -> Path:
    """Write ``payload`` with the machine's description to ``results/<name>.json`` (atomically)."""
    return atomic_write_json(Path(results or results_dir()) / f"{name}.json", {"machine": machine(), **payload})
