"""Run recipes: TOML files under ``pipelines/`` with the tables ``data``, ``preprocessing``,
``model``, ``training`` and ``export``.

A recipe gives defaults; command-line options override single values. Unknown keys are
errors that name the key and the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe into nested dicts.

    Raises:
        FileNotFoundError: the recipe does not exist (the message lists ``pipelines/``).
        ValueError: the file is not valid TOML.

    Example:
        >>> recipe = load_recipe("pipelines/phantom_demo.toml")  # doctest: +SKIP
        >>> recipe["model"]["name"]  # doctest: +SKIP
        'tam_unet'
    """
    path = Path(path)
    if not path.is_file():
        available = sorted(p.name for p in Path("pipelines").glob("*.toml")) if Path("pipelines").is_dir() else []
        raise FileNotFoundError(f"recipe {path} not found; available in pipelines/: {', '.join(available) or 'none'}")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None


def check_keys(section: Mapping[str, Any], valid: set[str] | frozenset[str], where: str) -> None:
    """Refuse unknown keys, naming the key and the valid ones."""
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in [{where}]; "
            f"valid keys: {', '.join(sorted(valid))}"
        )


# [data] keys: those of prepare, plus the phantom settings that fit uses to make its demo data.
PREPARE_DATA_KEYS = frozenset(
    {"src", "out", "label_map", "split", "seed", "stratify", "slices", "margin", "compression", "shard_mb", "workers",
     "on_error", "mix_phantom"}
)
PHANTOM_DATA_KEYS = frozenset({"phantom_cases", "phantom_seed", "phantom_size", "phantom_slices", "phantom_spacing_mm"})
DATA_KEYS = PREPARE_DATA_KEYS | PHANTOM_DATA_KEYS
PREPROCESSING_KEYS = frozenset({"window", "image_size", "context", "normalization", "spacing_mm", "context_mm"})
