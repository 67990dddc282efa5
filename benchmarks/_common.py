"""Shared helpers of the benchmark scripts: phantom data of realistic size, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("KERAS_LIVSEG_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "keras_livseg"))


def phantom_volumes(cases: int, size: int = 512, slices: tuple[int, int] = (200, 300), seed: int = 7) -> Path:
    """A cached folder of LiTS-layout phantom volumes of realistic size."""
    from keras_livseg.data.phantom import write_phantom_dataset

    folder = DATA / f"bench-phantom-{cases}x{size}-{slices[0]}-{slices[1]}-s{seed}"
    if not (folder / "phantom.json").is_file():
        write_phantom_dataset(folder, cases, seed, size=size, slices=slices, overwrite=True)
    return folder


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line([r.get(c, "") for c in columns]) for r in rows])


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
