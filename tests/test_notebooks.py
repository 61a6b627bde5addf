"""Executable documentation: every notebook in notebooks/ runs top to bottom (tiny models, CPU) and matches its
generator, and the example of docs/usage.md runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_ensembles.ipynb", "03_property_testing.ipynb"]


def _kernel_manager() -> Any:
    """A python3 kernel that runs this interpreter (the venv's), whatever other kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    ksm = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    # argv "python" is replaced by sys.executable; without the venv's kernelspec, ipykernel's native one is used
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    if os.environ.get("PYTEST_XDIST_WORKER"):  # 2 workers on 2 cores: one torch thread per kernel
        monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(nb, km=_kernel_manager(), timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell and the exception
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream").strip()
    assert printed == sys.prefix, f"the notebook kernel ran {printed!r}, not this environment ({sys.prefix})"


def test_notebooks_match_their_generator() -> None:
    result = subprocess.run([sys.executable, str(NOTEBOOKS / "build_notebooks.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_generator_is_deterministic_and_complete() -> None:
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import build_notebooks
    finally:
        sys.path.remove(str(NOTEBOOKS))
    assert sorted(build_notebooks.NOTEBOOKS) == NAMES
    for name in NAMES:
        assert build_notebooks.render(name) == build_notebooks.render(name)


def test_usage_doc_ten_line_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    example = re.search(r"## Ten lines\s+```python\n(.*?)```", text, re.S)
    assert example is not None, "docs/usage.md lost its '## Ten lines' python example"
    source = example.group(1)
    assert len(source.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(source, "docs/usage.md", "exec"), scope)
    assert sorted(os.listdir(tmp_path / "outputs" / "my-adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    import funcpeft

    tree, _ = funcpeft.load_adapter(tmp_path / "outputs" / "my-adapter")
    assert all(e["lora_B"].abs().sum() > 0 for e in tree.values()), "the saved adapter was not trained (lora_B = 0)"
