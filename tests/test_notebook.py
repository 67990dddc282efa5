"""notebooks/quickstart.ipynb runs from top to bottom (its code cells, in order, in a fresh process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = dict(os.environ, MPLBACKEND="Agg", QUICKSTART_DIR=str(tmp_path / "work"),
               KERAS_LIVSEG_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, str(script)], cwd=NOTEBOOK.parents[1], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path / "work"
    assert (work / "eval" / "figures" / "overlays.png").stat().st_size > 1000
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["volume"]["liver"]["dice_global"] <= 1.0
    assert "| " in result.stdout  # the printed metrics table
