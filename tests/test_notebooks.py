"""The tutorial notebooks execute without error (kernel python3 of this interpreter),
and the committed copies are the generator's cells with their outputs."""

import glob
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
sys.path.insert(0, NOTEBOOK_DIR)

import make_notebooks  # noqa: E402


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """Kernel "python3" resolves to this interpreter, whatever kernels are installed."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(path=str(tmp_path / "kernels" / "python3"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")


def test_every_generated_notebook_is_committed():
    assert sorted(make_notebooks.NOTEBOOKS) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_matches_generator_and_has_outputs(name):
    path = os.path.join(NOTEBOOK_DIR, name)
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    expected = make_notebooks.build(make_notebooks.NOTEBOOKS[name])
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in expected.cells], (
        f"{name} differs from notebooks/make_notebooks.py; run: python notebooks/make_notebooks.py {name[:2]}"
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "committed without executing"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the committed notebook"
    assert os.path.getsize(path) < 300_000


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, python3_kernel):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK_DIR}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
