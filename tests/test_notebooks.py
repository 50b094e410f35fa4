"""examples/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel), so the notebook cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_notebook(path: Path, cwd: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # start from nothing: stored outputs must not satisfy the checks below
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise AssertionError(f"{out['ename']}: {out['evalue']}")
            text.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(text)


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))  # the kernel inherits the environment
    out = run_notebook(EXAMPLES / "quickstart.ipynb", EXAMPLES)
    assert "generate_tokens gives the same: True" in out
    assert "1152 B per token per layer" in out
    assert "positions written per slot: [40, 0, 17]" in out
    err = float(re.search(r"max relative difference ([0-9.e+-]+)", out).group(1))
    assert err <= 1e-5
    assert out.count("<Figure") >= 2  # the image and the cache plots were drawn


def test_benchmark_plots(tmp_path):
    """bench/plots.py turns the stored results into the PNGs RESULTS.md shows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plots", Path(__file__).resolve().parents[1] / "bench" / "plots.py")
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    made = plots.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in made) == ["kernels.png", "mla.png", "qwen3_vl.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in made)
