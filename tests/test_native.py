"""The compiled CPU kernels (saelib/csrc/auxk.c): AuxK's selection, decode and backward against
the torch ops and torch.topk, and the loader's fallback when they cannot be built."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saelib import native
from saelib.kernels import LatentPattern, chained_row_gradients, gather_preacts, sparse_decode, sparse_rows_decode

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc) to build the kernels")


@pytest.fixture(autouse=True)
def fresh_library(monkeypatch):
    """Each test loads the kernels afresh and leaves no state behind."""
    monkeypatch.delenv("SAELIB_NATIVE", raising=False)
    native.reset()
    yield
    native.reset()


def _weights(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    W_enc, W_dec = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    b_enc, b_pre = 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(d, generator=g)
    return [t.requires_grad_() for t in (W_enc, b_enc, W_dec, b_pre)]


def _grads(outputs, inputs, seed):
    """Gradients of a random linear function of ``outputs`` with respect to ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("pre_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chained", [False, True])
def test_native_auxk_has_the_torch_ops_values_and_gradients(pre_dtype, chained):
    # 600 tokens: two full blocks of NATIVE_BLOCK_TOKENS and a part; 1500 dead rows of 2048 latents
    B, d, n, r, k = 600, 24, 2048, 1500, 64
    W_enc, b_enc, W_dec, b_pre = _weights(n, d, 0)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1)).requires_grad_()
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:r]
    pre = ((x - b_pre) @ W_enc.T + b_enc).detach()[:, rows]
    pre[:50] = -1.0  # tokens whose kept dead pre-activations are all negative: nothing to decode
    pre = pre.to(pre_dtype)
    inputs = [x, W_enc, b_enc, W_dec, b_pre]
    with chained_row_gradients() if chained else torch.enable_grad():
        out, chosen = sparse_rows_decode(x, W_enc, b_enc, W_dec, b_pre, rows, pre, k)
    # the same kept columns through the torch ops
    indices = rows[chosen]
    pattern = LatentPattern(indices, n)
    values = torch.relu(gather_preacts(x, W_enc, b_enc, indices, pre, b_pre, pattern, positions=chosen))
    reference = sparse_decode(values, indices, W_dec, pattern)
    torch.testing.assert_close(out, reference)
    assert not out[:50].any()
    for name, got, want in zip(["x", "W_enc", "b_enc", "W_dec", "b_pre"], _grads([out], inputs, 3),
                               _grads([reference], inputs, 3)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("r, k", [(1500, 64), (40, 40), (40, 1), (8, 3)])
def test_native_selection_keeps_torch_topk_values(r, k):
    g = torch.Generator().manual_seed(r + k)
    pre = torch.randn(300, r + 7, generator=g)
    pre[:, :r:3] = pre[:, :1]  # every third column ties with the first
    pre[5, :] = 0.0  # a row of equal values
    pre[6, 1] = float("nan")  # a NaN is never kept
    pre[7, :] = float("-inf")
    W_enc, b_enc, W_dec, b_pre = (t.detach() for t in _weights(r + 7, 4, 0))
    _, chosen = sparse_rows_decode(torch.zeros(300, 4), W_enc, b_enc, W_dec, b_pre, torch.arange(r), pre[:, :r], k)
    assert (chosen[:, 1:] > chosen[:, :-1]).all() and chosen.min() >= 0 and chosen.max() < r  # distinct, increasing
    inf = float("-inf")
    as_kept = pre.nan_to_num(nan=inf, neginf=inf)  # a NaN counts as -inf (kept only when every column is)
    torch.testing.assert_close(as_kept.gather(1, chosen).sort(descending=True).values, as_kept[:, :r].topk(k).values)


def test_forward_with_native_auxk_equals_the_torch_ops_in_a_training_step(monkeypatch):
    from saelib.sae import TopKSAE

    sae = TopKSAE(32, 1024, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(700, 32, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(1024, dtype=torch.bool).index_fill_(0, torch.arange(0, 1024, 3), True)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("SAELIB_NATIVE", setting)
        native.reset()
        sae.zero_grad()
        out = sae.train_forward(x, dead, k_aux=16)
        out.loss.backward()
        results.append((out.auxk_loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
        if setting == "1":  # the kernels were built and ran: a failed build would compare torch with torch
            assert native.unavailable() is None
    assert native.unavailable() == "SAELIB_NATIVE=0 turns them off"
    (aux_native, grads_native), (aux_torch, grads_torch) = results
    assert aux_native > 0
    torch.testing.assert_close(aux_native, aux_torch)
    for name, grad in grads_native.items():
        torch.testing.assert_close(grad, grads_torch[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    assert native.library() is not None and native.unavailable() is None
    built = list((tmp_path / "native").glob("auxk-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native.reset()
    assert native.library() is not None
    files = lambda: sorted(p for p in (tmp_path / "native").iterdir() if not p.name.endswith(".lock"))  # noqa: E731
    assert [p.stat().st_mtime_ns for p in files()] == [mtime]  # reused, no temporaries left
    # a changed source (a newer saelib) builds anew beside the older build, which a process of that
    # version sharing the folder may still load; another machine's build stays too
    other_machine = tmp_path / "native" / "auxk-000000000000-000000000000.so"
    other_machine.write_bytes(b"")
    changed = tmp_path / "auxk.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    native.reset()
    assert native.library() is not None
    assert len(files()) == 3 and other_machine in files() and built[0] in files()


def test_an_interrupted_first_build_builds_again_and_cc_may_carry_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "env cc")  # a compiler command with arguments, as "ccache gcc"
    build = native._build

    def interrupted(compiler):
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        native.library()
    monkeypatch.setattr(native, "_build", build)
    assert native.library() is not None and native.unavailable() is None  # not a silent fallback


def test_the_kernels_refuse_arguments_that_do_not_fit():
    W_enc, b_enc, W_dec, b_pre = _weights(64, 8, 0)
    x, rows, pre = torch.randn(10, 8), torch.arange(20), torch.randn(10, 20)
    with pytest.raises(ValueError, match=r"rows must be int64 latent ids, got torch.int32; pass rows.long\(\)"):
        sparse_rows_decode(x, W_enc, b_enc, W_dec, b_pre, rows.int(), pre, 4)
    with pytest.raises(ValueError, match=r"x has shape \(300, 8\), but W_dec \(64, 8\) and pre_rows \(10, 20\) need \(10, 8\)"):
        sparse_rows_decode(torch.randn(300, 8), W_enc, b_enc, W_dec, b_pre, rows, pre, 4)
    with pytest.raises(ValueError, match=r"rows has shape \(19,\)"):
        sparse_rows_decode(x, W_enc, b_enc, W_dec, b_pre, rows[:19], pre, 4)
    with pytest.raises(ValueError, match=r"latent ids in \[0, 64\), got 50 to 69"):
        sparse_rows_decode(x, W_enc, b_enc, W_dec, b_pre, rows + 50, pre, 4)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address space's size from /proc")
def test_a_kernel_without_memory_for_its_scratch_raises_memory_error():
    """Under an address-space limit that leaves 256 MB free, selecting 32 of 50M dead latents (600 MB
    of scratch in the kernel's thread) raises a MemoryError that says what to do, instead of writing
    through a null pointer. In a child process, so that the limit binds it alone."""
    script = textwrap.dedent("""
        import resource, torch
        from saelib import native
        lib = native.library()
        r = 50_000_000
        pre, idx, val = torch.zeros(1, r), torch.empty(1, 32, dtype=torch.long), torch.empty(1, 32)
        size = next(line for line in open("/proc/self/status") if line.startswith("VmSize:"))
        free = int(size.split()[1]) * 1024 + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (free, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            lib.saelib_select(pre.data_ptr(), 0, 1, r, r, 32, idx.data_ptr(), val.data_ptr(), 1)
        except MemoryError as err:
            print("MemoryError:", err)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("MemoryError: saelib's CPU kernel saelib_select could not allocate its scratch"), run.stdout
    assert "SAELIB_NATIVE=0" in run.stdout


@pytest.mark.parametrize("compiler, reason", [("no-such-cc", "no C compiler `no-such-cc` on PATH"),
                                               ("false", "building them failed: `false auxk.c` failed")])
def test_without_the_kernels_auxk_falls_back_to_torch_ops_and_says_why(compiler, reason, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_HOME", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    assert native.library() is None
    assert native.unavailable().startswith(reason)
    W_enc, b_enc, W_dec, b_pre = _weights(64, 8, 0)
    x = torch.randn(10, 8)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are not in use .*AuxK runs on torch ops"):
        assert sparse_rows_decode(x, W_enc, b_enc, W_dec, b_pre, torch.arange(20), torch.randn(10, 20), 4) is None
    assert not [p for p in (tmp_path / "native").glob("*") if not p.name.endswith(".lock")]  # nothing built is left


def test_the_kernels_apply_to_fp32_on_the_cpu_only():
    W_enc, b_enc, W_dec, b_pre = (t.detach().double() for t in _weights(64, 8, 0))
    assert sparse_rows_decode(torch.randn(10, 8).double(), W_enc, b_enc, W_dec, b_pre, torch.arange(20),
                              torch.randn(10, 20).double(), 4) is None


def test_a_k_the_kernels_cannot_keep_goes_to_the_torch_ops():
    W_enc, b_enc, W_dec, b_pre = (t.detach() for t in _weights(64, 8, 0))
    for k in (0, 21):  # none, or more than the 20 rows
        assert sparse_rows_decode(torch.randn(10, 8), W_enc, b_enc, W_dec, b_pre, torch.arange(20),
                                  torch.randn(10, 20), k) is None
