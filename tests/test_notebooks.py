"""The notebooks as committed: valid nbformat (cell ids too), no outputs, one tagged ``parameters``
cell whose preset defaults to ``lesson`` (nbval injects ``ci``), and a markdown opening that states the question."""

import warnings
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_every_notebook_is_found():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(len(NOTEBOOKS))] and len(NOTEBOOKS) >= 9


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. nbformat's MissingIDFieldWarning for a cell without an id
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "committed with outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'preset = "lesson"' in params[0].source  # class time; nbval injects ci
    assert nb.cells[0].cell_type == "markdown" and "**Question.**" in nb.cells[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_hidden_solution_has_a_cell_to_work_in_before_it(path):
    cells = nbformat.read(path, as_version=4).cells
    for i, cell in enumerate(cells):
        if "solution" in cell.metadata.get("tags", []):
            before = cells[i - 1]
            assert before.cell_type == "code" and "exercise" in before.metadata.get("tags", []), i
            assert all(line.startswith("#") for line in before.source.splitlines()), "the answer cell starts empty"


@pytest.fixture(scope="module")
def lab_metadata():
    """The top-level metadata JupyterLab writes into a notebook it opens: the kernelspec's name, display
    name and language, and the ``language_info`` of a real kernel's ``kernel_info_reply``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    spec = KernelSpecManager().get_kernel_spec("python3")
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        info = client.kernel_info(reply=True, timeout=60)["content"]["language_info"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return {"kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": "python3"},
            "language_info": info}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lab_opens_a_notebook_unmodified(path, lab_metadata):
    # Lab overwrites any difference here as soon as the kernel starts, and marks the notebook modified
    nb = nbformat.read(path, as_version=4)
    assert (nb.nbformat, nb.nbformat_minor) == (nbformat.current_nbformat, nbformat.current_nbformat_minor)
    version = nb.metadata.get("language_info", {}).get("version")
    without_version = {**nb.metadata, "language_info": {**nb.metadata.get("language_info", {}), "version": None}}
    assert without_version == {**lab_metadata, "language_info": {**lab_metadata["language_info"], "version": None}}
    if version != lab_metadata["language_info"]["version"]:
        pytest.skip(f"committed for Python {version}; on this kernel's Python "
                    f"{lab_metadata['language_info']['version']} Lab marks the notebooks modified once")


def test_lab_never_asks_to_fetch_news(tmp_path):
    """The set-up's JupyterLab (a room may have no network) starts without the news question."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    runtime = tmp_path / "runtime"  # where the server writes its port (port 0: the OS picks a free one)
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--port=0",
                            "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)})
    try:
        for _ in range(120):
            try:
                port = json.loads(next(runtime.glob("jpserver-*.json")).read_text())["port"]
                url = f"http://127.0.0.1:{port}/lab/api/settings/@jupyterlab/apputils-extension:notification"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    # Lab applies the set-up's overrides as the settings' defaults
                    settings = {k: v.get("default") for k, v in json.load(reply)["schema"]["properties"].items()}
                break
            except (StopIteration, ValueError, KeyError, OSError):  # not started, or its file half written
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within a minute")
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    assert settings["fetchNews"] == "false" and settings["checkForUpdates"] is False


def test_papermill_injects_the_parameters_and_the_notebook_writes_its_figures(tmp_path):
    """The path `make demo` and `make figures` take: papermill, with saelib's engine (found through its
    entry point), injects the parameters (the ci preset and folders of the test's own) after the tagged
    cell, and the notebook trains and writes its figure.
    Notebook 06 (planted features) is the shortest that trains and plots without widgets."""
    import json
    import subprocess
    import sys

    out, figures = tmp_path / "06.ipynb", tmp_path / "figures"
    done = subprocess.run([sys.executable, "-m", "papermill", "--engine", "saelib", "--log-level", "WARNING",
                           "06_toy_ground_truth.ipynb",
                           str(out), "-p", "preset", "ci", "-p", "figures_root", str(figures), "-p", "sweep_root",
                           str(tmp_path / "runs"), "-p", "seed", "1"],
                          cwd=NOTEBOOKS[0].parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "without encryption" not in done.stderr  # ipykernel's warning for a kernel reached over plain TCP
    cells = nbformat.read(out, as_version=4).cells
    assert "injected-parameters" in cells[2].metadata.tags and 'preset = "ci"' in cells[2].source
    assert not [o for c in cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert all((figures / "ci" / f"06_recovery.{ext}").stat().st_size > 0 for ext in ("json", "html", "png"))
    data = json.loads((figures / "ci" / "06_recovery.json").read_text())
    assert data["setup"]["m"] == 128 and len(data["runs"]) == 9  # the ci grid: 3 sizes x 3 k
    assert max(r["mbc"] for r in data["runs"]) > data["random_mbc"] + 0.1  # training found planted features
    assert (tmp_path / "runs").is_dir() and not (NOTEBOOKS[0].parents[1] / "runs" / "06_toy_ground_truth-ci-seed1").exists()
