"""Regenerate the notebooks of this folder from their jupytext sources, and execute them.

    .venv/bin/python notebooks/sync.py                   # every NN_name.py -> NN_name.ipynb (or: make notebooks)
    .venv/bin/python notebooks/sync.py 02_ensembles.py   # only these

The NN_name.py files (jupytext "percent" format) are the sources: edit those. Each .ipynb is written from its source
and executed top to bottom on this environment's kernel, with funcpeft imported from this checkout, so that it
carries its outputs (and plots) for GitHub. tests/test_notebooks.py fails if a .ipynb does not match its source.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = sorted(HERE.glob("[0-9][0-9]_*.py"))


def to_notebook(source: Path) -> nbformat.NotebookNode:
    """The notebook of a jupytext source, without outputs, with ids and metadata that do not change between runs."""
    nb = jupytext.read(source, fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # jupytext draws random ids: regenerating would rewrite every cell
    nb.metadata.get("jupytext", {}).pop("text_representation", None)  # describes the .py, not the .ipynb
    return nb


def kernel_manager() -> Any:
    """A python3 kernel that runs this interpreter (the venv's), whatever other kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    ksm = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    # argv "python" is replaced by sys.executable; without the venv's kernelspec, ipykernel's native one is used
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def execute(nb: nbformat.NotebookNode, cwd: Path) -> None:
    """Run every cell of `nb` in place, in a fresh kernel started in `cwd`; raises CellExecutionError on failure."""
    from nbclient import NotebookClient

    # the kernel inherits the environment: put this checkout first, whatever the venv's editable install points at
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    client = NotebookClient(
        nb, km=kernel_manager(), timeout=600, record_timing=False, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    nb.metadata["language_info"] = {"name": "python"}  # not the kernel's exact Python version: no diff between runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="*", help="NN_name.py files of this folder (default: all)")
    args = p.parse_args(argv)
    sources = [HERE / Path(s).name for s in args.sources] or SOURCES
    unknown = [s.name for s in sources if s not in SOURCES]
    if unknown:
        p.error(f"not notebook sources: {unknown}; the sources are {[s.name for s in SOURCES]}")
    for source in sources:
        nb = to_notebook(source)
        with tempfile.TemporaryDirectory() as cwd:  # whatever a notebook writes stays out of the checkout
            execute(nb, Path(cwd))
        nbformat.validate(nb)
        target = source.with_suffix(".ipynb")
        nbformat.write(nb, target)
        print(f"{target.relative_to(ROOT)}: {target.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
