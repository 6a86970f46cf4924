"""nbval runs every notebook at the preset in ``SAELIB_NOTEBOOK_PRESET`` (``ci`` unless set), the
way ``papermill -p preset ci`` would: one assignment appended to the tagged ``parameters`` cell, so
the committed default (a run sized for class time) stays what a reader opening the notebook gets."""

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    preset = os.environ.get("SAELIB_NOTEBOOK_PRESET", "ci")
    for item in items:
        cell = getattr(item, "cell", None)  # nbval's IPyNbCell: the notebook cell it executes
        if cell is not None and "parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source = f"{cell.source}\npreset = {preset!r}  # injected by notebooks/conftest.py"
