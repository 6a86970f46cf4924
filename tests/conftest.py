"""Shared fixtures: the real embedded language model, loaded once per test session."""

import os
from pathlib import Path

import pytest
import torch

# Tests share the project's cache (the converted model is reused) unless told otherwise.
os.environ.setdefault("SAELIB_HOME", str(Path(__file__).resolve().parents[1] / ".cache"))
# No hub here: without this, a name that is not found locally costs ~50 s of client retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several test processes: one thread each (and in the kernels and processes it starts),
    # as OpenMP threads that outnumber the cores spin while they wait for one
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def lm():
    from saelib.models import load_lm

    return load_lm("smollm2-135m")


@pytest.fixture(scope="session")
def val_contexts(lm):
    """A few real held-out contexts of 64 tokens."""
    from saelib import data

    return data.contexts("wikipedia", lm.tokenizer, "validation", ctx_len=64, max_tokens=64 * 16)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matmuls lose more to threading than they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
