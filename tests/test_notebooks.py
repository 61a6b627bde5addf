"""Executable documentation: every notebook in notebooks/ runs top to bottom (tiny models, CPU), the committed .ipynb
files match their jupytext sources and carry error-free outputs, and the example of docs/usage.md runs."""

from __future__ import annotations

import base64
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

import jupytext
import nbformat
import pytest

pytestmark = pytest.mark.slow  # `make test-fast` skips this file (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart", "02_ensembles", "03_property_testing"]
REGENERATE = "regenerate it: python notebooks/sync.py (or make notebooks)"


def _kernel_manager() -> Any:
    """A python3 kernel that runs this interpreter (the venv's), whatever other kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    ksm = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    # argv "python" is replaced by sys.executable; without the venv's kernelspec, ipykernel's native one is used
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _source(name: str) -> nbformat.NotebookNode:
    return jupytext.read(NOTEBOOKS / f"{name}.py", fmt="py:percent")


def _committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_every_notebook_has_a_source_and_the_reverse() -> None:
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_source_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The jupytext source, converted to a notebook, runs top to bottom on the venv's kernel with this checkout."""
    from nbclient import NotebookClient

    if os.environ.get("PYTEST_XDIST_WORKER"):  # 2 workers on 2 cores: one torch thread per kernel
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the kernel inherits the environment: it must import funcpeft from the checkout under test, not the editable one
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    nb = _source(name)
    assert sum(c.cell_type == "code" for c in nb.cells) >= 3, f"{name}.py lost its `# %%` cell markers"
    nb.cells.append(nbformat.v4.new_code_cell("import sys, funcpeft; print(sys.prefix); print(funcpeft.__file__)"))
    client = NotebookClient(nb, km=_kernel_manager(), timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell and the exception
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream").split()
    assert len(printed) == 2, f"the last cell printed {printed}"
    assert printed[0] == sys.prefix, f"the notebook kernel ran {printed[0]!r}, not this environment ({sys.prefix})"
    assert Path(printed[1]).is_relative_to(ROOT), f"the kernel imported {printed[1]}, not funcpeft from {ROOT}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source(name: str) -> None:
    source, committed = _cells(_source(name)), _cells(_committed(name))
    for i, (want, got) in enumerate(zip(source, committed)):
        diff = "\n".join(difflib.unified_diff(got[1].splitlines(), want[1].splitlines(), "ipynb", "py", lineterm=""))
        assert got == want, f"{name}.ipynb cell {i} ({got[0]}) != {name}.py ({want[0]}):\n{diff}\n{REGENERATE}"
    assert len(committed) == len(source), f"{name}.ipynb: {len(committed)} cells, {name}.py {len(source)}; {REGENERATE}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_carries_clean_outputs(name: str) -> None:
    """Executed top to bottom in one kernel (GitHub shows the outputs), with no error, warning or oversized image."""
    code = [c for c in _committed(name).cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}.ipynb not run top to bottom: {counts}; {REGENERATE}"
    assert any(c.outputs for c in code), f"{name}.ipynb has no outputs; {REGENERATE}"
    for i, cell in enumerate(code, 1):
        for out in cell.outputs:
            assert out.output_type != "error", f"{name}.ipynb [{i}]: {out.ename}: {out.evalue}"
            assert out.get("name") != "stderr", f"{name}.ipynb [{i}] wrote to stderr:\n{out.text}"
        images = [base64.b64decode(o.data["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]
        if "plt.show()" in cell.source:
            assert images, f"{name}.ipynb [{i}] shows a figure but has no image output"
        for png in images:
            assert len(png) < 100_000, f"{name}.ipynb [{i}]: a {len(png)} byte image; lower the figure's dpi"


def test_usage_doc_ten_line_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    example = re.search(r"## Ten lines\s+```python\n(.*?)```", text, re.S)
    assert example is not None, "docs/usage.md lost its '## Ten lines' python example"
    source = example.group(1)
    assert len(source.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(source, "docs/usage.md", "exec"), scope)
    assert sorted(os.listdir(tmp_path / "outputs" / "my-adapter")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    import funcpeft

    tree, _ = funcpeft.load_adapter(tmp_path / "outputs" / "my-adapter")
    assert all(e["lora_B"].abs().sum() > 0 for e in tree.values()), "the saved adapter was not trained (lora_B = 0)"
