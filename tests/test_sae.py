"""The SAE models: sparse kernels, encode/decode, loss terms, decoder constraint, files."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saelib.kernels import LatentPattern, gather_preacts, sparse_decode
from saelib.files import sha256_file
from saelib.normalize import Normalizer
from saelib import load
from saelib.sae import Latents, TopKSAE


def make_sae(d_in=16, n_latents=64, k=4, seed=0, **kwargs):
    return TopKSAE(d_in, n_latents, k, generator=torch.Generator().manual_seed(seed), **kwargs)


def random_latents(B=8, k=4, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    return torch.rand(B, k, generator=g), indices


def test_sparse_decode_equals_dense_values_and_grads():
    values, indices = random_latents()
    values.requires_grad_(True)
    W = torch.randn(64, 16, requires_grad=True)
    grad_out = torch.randn(8, 16)

    sparse = sparse_decode(values, indices, W)
    g_sparse = torch.autograd.grad((sparse * grad_out).sum(), [values, W])
    dense = Latents(values, indices, 64).to_dense() @ W
    g_dense = torch.autograd.grad((dense * grad_out).sum(), [values, W])

    torch.testing.assert_close(sparse, dense)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b)


def test_gather_preacts_grads_equal_dense_autograd():
    _, indices = random_latents()
    x = torch.randn(8, 16, requires_grad=True)
    W = torch.randn(64, 16, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    grad_out = torch.randn(8, 4)

    with torch.no_grad():
        pre = x @ W.T + b
    sparse = gather_preacts(x, W, b, indices, pre)
    g_sparse = torch.autograd.grad((sparse * grad_out).sum(), [x, W, b])
    dense = (x @ W.T + b).gather(-1, indices)
    g_dense = torch.autograd.grad((dense * grad_out).sum(), [x, W, b])

    torch.testing.assert_close(sparse, dense)
    for a, b_ in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b_)

    # with b_pre subtracted inside: its gradient (-grad_b @ W) equals autograd's, with or without x's
    b_pre = torch.randn(16, requires_grad=True)
    with torch.no_grad():
        pre = (x - b_pre) @ W.T + b
    dense = ((x - b_pre) @ W.T + b).gather(-1, indices)
    for with_x in (True, False):
        inputs = [x, W, b, b_pre] if with_x else [W, b, b_pre]
        sparse = gather_preacts(x if with_x else x.detach(), W, b, indices, pre, b_pre)
        torch.testing.assert_close(sparse, dense)
        g_sparse = torch.autograd.grad((sparse * grad_out).sum(), inputs)
        g_dense = torch.autograd.grad((dense * grad_out).sum(), inputs, retain_graph=True)
        for a, b_ in zip(g_sparse, g_dense):
            torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("blocked", [False, True])
def test_encoder_and_decoder_share_one_latent_pattern_with_the_dense_gradients(blocked, monkeypatch):
    from saelib import kernels

    if blocked:  # AuxK's cache-sized blocks, made small: 3 blocks of 5, 5 and 2 tokens, 8 latents per block
        for name, value in (("BLOCK_MIN_PER_ROW", 5), ("BLOCK_TOKENS", 5), ("BLOCK_LATENTS", 8)):
            monkeypatch.setattr(kernels, name, value)
    _, indices = random_latents(B=12, k=5)
    indices = indices.view(3, 4, 5)  # leading dims: the pattern works on the flattened rows
    x = torch.randn(3, 4, 16, requires_grad=True)
    W_enc, W_dec = torch.randn(64, 16, requires_grad=True), torch.randn(64, 16, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    grad_out = torch.randn(3, 4, 16)
    with torch.no_grad():
        pre = x @ W_enc.T + b
    pattern = LatentPattern(indices, 64)
    assert pattern.blocked == blocked
    sparse = sparse_decode(gather_preacts(x, W_enc, b, indices, pre, pattern=pattern).relu(), indices, W_dec, pattern)
    g_sparse = torch.autograd.grad((sparse * grad_out).sum(), [x, W_enc, b, W_dec])
    assert pattern._csr is not None  # built once, by whichever backward ran first
    if blocked:
        assert len(pattern.csr()) == 3 and len(pattern.by_token()) == -(-len(indices.unique()) // 8)
    z = torch.zeros(3, 4, 64).scatter(-1, indices, (x @ W_enc.T + b).gather(-1, indices).relu())
    g_dense = torch.autograd.grad(((z @ W_dec) * grad_out).sum(), [x, W_enc, b, W_dec])
    torch.testing.assert_close(sparse, z @ W_dec)
    for a, b_ in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b_)


def test_dense_rows_decode_equals_dense_autograd_for_every_input():
    from saelib.kernels import dense_rows_decode

    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    W_enc, W_dec = (torch.randn(64, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b_enc = torch.randn(64, generator=g, dtype=torch.float64, requires_grad=True)
    b_pre = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randperm(64, generator=g)[:12]  # the code's latents, in the order of its columns
    chosen = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(10)])
    inputs = [x, W_enc, b_enc, W_dec, b_pre]
    pre = (x - b_pre) @ W_enc[rows].T + b_enc[rows]
    z = torch.zeros_like(pre).scatter(-1, chosen, pre.gather(-1, chosen).relu())
    dense = z @ W_dec[rows]
    fast = dense_rows_decode(x, W_enc, b_enc, W_dec, b_pre, rows, chosen, pre.detach())
    grad_out = torch.randn(10, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fast, dense)
    for a, b_ in zip(torch.autograd.grad((fast * grad_out).sum(), inputs),
                     torch.autograd.grad((dense * grad_out).sum(), inputs)):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("part", ["both", "first", "second"])
def test_chained_ops_add_their_row_gradients_into_one_tensor(part):
    """Within chained_row_gradients, a sparse code and a dense-rows code over the same weights (the
    main code and AuxK's) give autograd's gradients, whichever outputs the loss uses, and each
    weight's gradient is the kept row-gradient memory: no out-of-place sum."""
    from saelib import kernels

    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 16, generator=g)
    W_enc, W_dec = (torch.randn(64, 16, generator=g, requires_grad=True) for _ in range(2))
    b_enc, b_pre = torch.randn(64, generator=g, requires_grad=True), torch.randn(16, generator=g, requires_grad=True)
    params = [W_enc, b_enc, W_dec, b_pre]
    with torch.no_grad():
        pre = (x - b_pre) @ W_enc.T + b_enc
    indices = pre.topk(4).indices
    rows = torch.randperm(64, generator=g)[:12]
    chosen = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(10)])
    grad_out = torch.randn(2, 10, 16, generator=g)

    def outputs():
        values = gather_preacts(x, W_enc, b_enc, indices, pre, b_pre).relu()
        first = sparse_decode(values, indices, W_dec)
        second = kernels.dense_rows_decode(x, W_enc, b_enc, W_dec, b_pre, rows, chosen, pre[:, rows])
        return (first * grad_out[0]).sum(), (second * grad_out[1]).sum()

    def loss(first, second):
        return {"both": first + second, "first": first, "second": second}[part]

    expected = [grad.clone() for grad in torch.autograd.grad(loss(*outputs()), params)]  # the kept memories free again
    with kernels.chained_row_gradients():
        chained = outputs()
    loss(*chained).backward()
    for param, e in zip(params, expected):
        torch.testing.assert_close(param.grad, e)
    for W in (W_enc, W_dec):
        assert W.grad.data_ptr() in [memory.data_ptr() for memory in kernels._ROW_GRAD_MEMORY[id(W)]]


@pytest.mark.parametrize("arch", ["topk", "multitopk", "batchtopk", "relu"])
def test_forward_with_auxk_has_the_unchained_gradients_for_every_arch(arch):
    """TopKSAE.train_forward chains its ops' row gradients (the relu arch picks its code without
    gradient first): every parameter's gradient equals the one from the same forward unchained."""
    sae = make_sae(arch=arch, k=4)
    with torch.no_grad():
        sae.b_enc.normal_()  # relu's code is not empty
    x = torch.randn(24, 16)
    dead = torch.arange(64) % 3 == 0
    grads = []
    for forward in (TopKSAE.train_forward, TopKSAE.train_forward.__wrapped__):
        sae.zero_grad(set_to_none=True)
        forward(sae, x, dead, l1_coef=1e-3).loss.backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    for chained, plain in zip(*grads):
        torch.testing.assert_close(chained, plain)


def test_encode_is_relu_of_topk_and_decode_matches_dense():
    sae = make_sae()
    x = torch.randn(5, 3, 16)  # leading dims are kept
    latents = sae.encode(x)
    assert latents.values.shape == latents.indices.shape == (5, 3, 4)
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    torch.testing.assert_close(latents.values, pre.topk(4).values.relu())
    dense = latents.to_dense()
    assert dense.shape == (5, 3, 64) and ((dense != 0).sum(-1) <= 4).all()
    torch.testing.assert_close(sae.decode(latents), sae.decode(dense))
    values, indices = latents  # unpacks as a pair
    assert values is latents.values and indices is latents.indices


def test_preacts_reuse_one_buffer_across_calls_and_shapes():
    sae = make_sae()
    x1, x2 = torch.randn(8, 16), torch.randn(8, 16)
    ptr = sae._preacts(x1).data_ptr()
    pre2 = sae._preacts(x2)
    assert pre2.data_ptr() == ptr  # no new (B, n_latents) allocation per step
    torch.testing.assert_close(pre2, (x2 - sae.b_pre) @ sae.W_enc.T + sae.b_enc)
    small = sae._preacts(x1[:3])  # a smaller batch fits in the same memory
    assert small.data_ptr() == ptr and small.shape == (3, 64)
    torch.testing.assert_close(small, (x1[:3] - sae.b_pre) @ sae.W_enc.T + sae.b_enc)
    x3 = torch.randn(2, 20, 16)  # a larger one gets a new buffer, leading dims kept; more tokens than
    large = sae._preacts(x3)     # d_in: the bias rides in the GEMM as a column of ones
    assert large.shape == (2, 20, 64)
    torch.testing.assert_close(large, (x3 - sae.b_pre) @ sae.W_enc.T + sae.b_enc)


def test_encode_works_after_an_encode_under_inference_mode():
    """The kept buffers allocated under torch.inference_mode (a splice into the LM) cannot be written
    outside it; the next encode under no_grad, or while training, allocates them again."""
    sae, x = make_sae(), torch.randn(40, 16)  # more tokens than d_in: the workspace path
    with torch.inference_mode():
        first = sae.encode(x)
    with torch.no_grad():
        again = sae.encode(x)
    torch.testing.assert_close(again.values, first.values)
    sae.train_forward(x).loss.backward()  # and a training step after it
    assert sae.W_enc.grad is not None


def test_row_gradients_reuse_their_memory_only_when_nothing_holds_it():
    sae = make_sae()
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_()
    x = torch.randn(32, 16)

    def loss():
        return sae(x).loss

    loss().backward()
    memory = sae.W_dec.grad.data_ptr()
    held, expected = sae.W_dec.grad.detach(), sae.W_dec.grad.clone()  # a user keeps an alias of the gradient
    sae.zero_grad(set_to_none=True)
    (2 * loss()).backward()
    assert sae.W_dec.grad.data_ptr() != memory and torch.equal(held, expected)  # the held memory is not reused
    torch.testing.assert_close(sae.W_dec.grad, 2 * expected)
    del held
    sae.zero_grad(set_to_none=True)
    loss().backward()
    assert sae.W_dec.grad.data_ptr() == memory  # free again: reused, no fresh (n, d) memory
    torch.testing.assert_close(sae.W_dec.grad, expected)
    loss().backward()  # accumulating into .grad: the new gradient gets its own memory
    torch.testing.assert_close(sae.W_dec.grad, 2 * expected)
    grads = torch.autograd.grad(loss(), [sae.W_enc, sae.W_dec])
    torch.testing.assert_close(grads[1], expected)
    torch.testing.assert_close(sae.W_dec.grad, 2 * expected)


def test_unit_norm_decoder_rows_and_tied_init():
    sae = make_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    untied = make_sae(tied_init=False)
    assert not torch.allclose(untied.W_enc, untied.W_dec)


@pytest.mark.parametrize(
    "d_in, n_latents, k, named",
    [(16, 64, 65, "k=65"), (16, 64, 0, "k"), (16, 64, -3, "k"), (0, 64, 4, "d_in"), (16, -1, 4, "n_latents")],
)
def test_bad_sizes_raise_value_error_naming_the_value(d_in, n_latents, k, named):
    with pytest.raises(ValueError, match=named):
        TopKSAE(d_in, n_latents, k)


def test_bad_arch_and_input_width():
    with pytest.raises(ValueError, match="arch"):
        TopKSAE(16, 64, 4, arch="gated")
    with pytest.raises(ValueError, match="d_in=16"):
        make_sae().encode(torch.randn(3, 17))
    with pytest.raises(ValueError, match="k=100"):
        make_sae().encode(torch.randn(3, 16), k=100)


@pytest.mark.parametrize("call, match", [
    (lambda sae: sae.encode(torch.randint(-3, 4, (4, 16))), r"Input has dtype torch.int64; the SAE takes floating-point"),
    (lambda sae: sae(torch.full((2, 16), float("nan"))), r"Input contains NaN or Inf; clean the activations\.$"),
    (lambda sae: sae.encode(torch.tensor(1.0)), r"\(\.\.\., d_in=16\) tensor of activations, got Tensor of shape \(\)\.$"),
    (lambda sae: sae.encode([0.5] * 16), r"tensor of activations, got list\.$"),
    (lambda sae: Latents(torch.rand(1, 4), torch.tensor([[0, 1, 2]])), r"values \(1, 4\) and indices \(1, 3\) must have the same shape"),
    (lambda sae: sae.decode(Latents(torch.rand(1, 3), torch.tensor([[0, 1, 64]]))), r"integers in \[0, 64\) for this SAE, got torch.int64 in \[0, 64\]"),
    (lambda sae: sae.decode(Latents(torch.rand(1, 2), torch.tensor([[-1.0, 2.0]]))), r"integers in \[0, 64\) for this SAE, got torch.float32"),
    (lambda sae: sae.decode(torch.ones(2, 64, dtype=torch.int64)), r"A dense code must be floating point, got torch.int64"),
    (lambda sae: TopKSAE(16, 64, 4, normalizer=Normalizer(torch.zeros(16), 0.0)), r"normalizer.scale must be a positive finite number, got 0.0"),
    (lambda sae: TopKSAE(16, 64, 4, tied_init="no"), r"tied_init must be True or False, got 'no'\.$"),
    (lambda sae: sae(torch.randn(2, 16), torch.zeros(64)), r"dead_mask must be a \(64,\) bool tensor, True for each dead latent, got torch.float32 of shape \(64,\)\.$"),
    (lambda sae: sae(torch.randn(2, 16), torch.zeros(63, dtype=torch.bool)), r"got torch.bool of shape \(63,\)\.$"),
    (lambda sae: sae(torch.randn(2, 16), [True] * 64), r"dead_mask must be .* got list\.$"),
    (lambda sae: sae(torch.randn(2, 16), torch.ones(64, dtype=torch.bool), k_aux=-1), r"k_aux must be a positive integer .* got -1\.$"),
])
def test_inputs_that_are_not_activations_or_codes_are_refused_in_one_sentence(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_sae())


def test_a_dense_code_of_another_float_dtype_decodes_as_float32():
    sae, z = make_sae(), torch.rand(2, 64)
    torch.testing.assert_close(sae.decode(z.double()), sae.decode(z))


def test_decoder_grad_projection_and_renormalisation():
    sae = make_sae()
    x = torch.randn(32, 16)
    sae(x).loss.backward()
    sae.remove_parallel_grads()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert parallel.abs().max() < 1e-6
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sae(x).loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_auxk_grads_reach_only_dead_latents():
    sae = make_sae()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 20, 41]] = True
    out = sae(torch.randn(32, 16), dead, k_aux=2)
    assert out.auxk_loss > 0
    out.auxk_loss.backward()
    for grad in (sae.W_enc.grad, sae.W_dec.grad):
        touched = grad.abs().sum(-1) > 0
        assert touched[dead].all(), "every dead latent (chosen in some row) gets encoder and decoder grads"
        assert not touched[~dead].any(), "live latents get no AuxK grads"
    assert not sae(torch.randn(8, 16), torch.zeros(64, dtype=torch.bool)).auxk_loss


def test_auxk_shrinks_dead_latents_whose_decoder_rows_miss_the_residual():
    """Where AuxK can cost latents (notebook 02, section 3): the inputs and the live latents' decoder rows
    lie in the first 8 dimensions, so the residual does too, and the dead latents' decoder rows lie in the
    last 8. Their reconstruction of the residual is then pure error (AuxK loss above 1), and its gradient
    pushes every selected dead latent's pre-activation down, further from the top-k cut."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(16, 32, 2, generator=g)
    live, dead = torch.arange(16), torch.arange(16, 32)
    with torch.no_grad():
        sae.W_dec[live, 8:] = 0
        sae.W_dec[dead, :8] = 0
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec)
        sae.W_enc[dead] = 0.05 * torch.randn(16, 16, generator=g).abs()  # small positive pre-activations
        sae.b_pre.zero_()
    x = torch.zeros(64, 16)
    x[:, :8] = torch.randn(64, 8, generator=g).abs()
    mask = torch.zeros(32, dtype=torch.bool)
    mask[dead] = True
    out = sae.train_forward(x, mask, k_aux=4)
    assert out.auxk_loss > 1
    out.auxk_loss.backward()
    chosen = sae.b_enc.grad[dead] != 0
    assert chosen.sum() >= 4 and (sae.b_enc.grad[dead][chosen] > 0).all(), "gradient descent lowers them all"


def test_multitopk_decodes_at_any_k_up_to_4k():
    sae = make_sae(arch="multitopk")
    x = torch.randn(10, 16)
    for k in (1, 4, 9, 16):
        assert sae.encode(x, k=k).values.shape == (10, k)
    out = sae(x)
    assert out.latents.values.shape == (10, 4) and out.multik_nmse > 0
    torch.testing.assert_close(out.loss, out.nmse + out.multik_nmse / 8)


def test_batchtopk_keeps_k_per_token_on_average_and_estimates_threshold():
    sae = make_sae(arch="batchtopk")
    x = torch.randn(64, 16)
    out = sae(x)
    assert out.l0 == pytest.approx(4.0, abs=0.01)
    assert torch.isfinite(sae.threshold)
    sae.eval()
    eval_latents = sae.encode(x)
    assert (eval_latents.values[eval_latents.values > 0] > sae.threshold).all()


@pytest.mark.parametrize("saturated", [False, True])
def test_batchtopk_searches_candidates_and_keeps_the_batchwide_largest(saturated):
    from saelib.sae import BATCHTOPK_CANDIDATES, _largest_positive

    sae = make_sae(n_latents=256, k=4, arch="batchtopk")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    if saturated:  # one token far larger than the rest takes more than its candidates: the full search
        x[0] *= 100
    latents = sae(x).latents
    pre = sae._preacts(x)
    expected = pre.relu() * _largest_positive(pre, 4 * 32)[0]
    torch.testing.assert_close(latents.to_dense(), expected.detach())
    assert int((latents.values > 0).sum()) == 4 * 32
    assert (int((latents.values[0] > 0).sum()) > BATCHTOPK_CANDIDATES * 4) == saturated


def test_threshold_for_target_l0():
    sae = make_sae(n_latents=256)
    x = torch.randn(512, 16)
    threshold = sae.set_threshold_for_l0(x, 10)
    assert threshold > 0
    assert sae.encode(x).l0().item() == pytest.approx(10, rel=0.05)
    sae.set_threshold(None)
    assert sae.encode(x).values.shape[-1] == 4


def test_relu_baseline_l1_term():
    sae = make_sae(arch="relu", k=None)
    out = sae(torch.randn(32, 16), l1_coef=0.5)
    torch.testing.assert_close(out.loss, out.nmse + 0.5 * out.l1)
    assert out.l0 > 4  # a ReLU code is not k-sparse


def test_save_load_round_trip(tmp_path):
    normalizer = Normalizer(torch.randn(16), 3.5)
    sae = make_sae(arch="multitopk", normalizer=normalizer, metadata={"model": "toy", "layer": 3})
    sae.set_threshold(0.25)
    folder = sae.save(tmp_path / "sae")
    config = json.loads((folder / "config.json").read_text())
    assert config["arch"] == "multitopk" and config["metadata"]["layer"] == 3 and "saelib_version" in config
    loaded = load(folder)
    for (name, a), b in zip(sae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.normalizer.scale == 3.5 and torch.equal(loaded.normalizer.mean, normalizer.mean)
    assert not loaded.training and not list(folder.glob(".*tmp*"))
    x = torch.randn(4, 16)
    torch.testing.assert_close(loaded.encode(x).values, sae.encode(x).values)


@pytest.mark.parametrize("arch", ["topk", "multitopk", "relu"])
def test_public_methods_take_and_return_raw_activations(arch):
    """encode/decode and sae(x) normalise inside: sae(x_raw) is the trainer's train_forward on the
    normalised batch, mapped back; its losses and latents are those of the normalised scale."""
    g = torch.Generator().manual_seed(1)
    normalizer = Normalizer(torch.randn(16, generator=g), 3.5)
    sae = make_sae(arch=arch, k=None if arch == "relu" else 4, normalizer=normalizer).eval()
    with torch.no_grad():
        sae.b_pre.normal_(generator=g)
    x = normalizer.invert(torch.randn(32, 16, generator=g))
    out = sae(x)
    trained = sae.train_forward(normalizer.apply(x))
    # relu's sae(x) decodes its dense code by a GEMM, encode's sparse code sums in another order
    exact = {} if arch == "relu" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)), **exact)
    torch.testing.assert_close(out.x_hat, normalizer.invert(trained.x_hat), rtol=0, atol=0)
    torch.testing.assert_close(out.loss, trained.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.latents.values, trained.latents.values, rtol=0, atol=0)


def test_identity_normalizer_passes_activations_through_unchanged():
    """With mean 0 and scale 1 there is nothing to apply: the input and the decoded tensor are used
    as they are, bit for bit the normalised-scale results."""
    sae = make_sae()
    x = torch.randn(8, 16)
    assert sae._normalised(x) is x
    z = sae.encode(x)
    decoded = sae._decode(z)
    assert sae._raw(decoded) is decoded
    assert torch.equal(sae(x).x_hat, sae.train_forward(x).x_hat)


def test_normalizer_fit_matches_the_two_pass_float64_statistics_and_refuses_constant_data():
    """``fit`` sums chunk by chunk in one pass; its mean and scale are the exact two-pass ones to
    float32 precision, a large offset included, and its chunks add up as one tensor's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 24, generator=g) * torch.rand(24, generator=g) * 3 + 40 * torch.randn(24, generator=g)
    fitted = Normalizer.fit(x)
    ref = x.double()
    scale = (ref - ref.mean(0)).pow(2).sum(-1).mean().sqrt().item()
    torch.testing.assert_close(fitted.mean, ref.mean(0).float(), rtol=1e-6, atol=1e-5)
    assert abs(fitted.scale - scale) < 1e-6 * scale
    chunked = Normalizer.fit_chunks([x[:7], x[7:3000], x[3000:]])
    assert torch.allclose(chunked.mean, fitted.mean, rtol=1e-6, atol=1e-5) and abs(chunked.scale - fitted.scale) < 1e-6 * scale
    for bad in (torch.full((3000, 8), 7.3), torch.zeros(2, 4), torch.full((4, 4), float("nan"))):
        with pytest.raises(ValueError, match="zero \\(or non-finite\\) spread"):
            Normalizer.fit(bad)


def test_load_errors_name_the_file_and_value(tmp_path):
    folder = make_sae().save(tmp_path / "sae")
    tensors = load_file(str(folder / "sae.safetensors"))
    tensors["W_dec"] = torch.zeros(32, 16)
    save_file(tensors, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"sae.safetensors is corrupt"):
        load(folder)
    _edited_config(folder, sha256={"sae.safetensors": sha256_file(folder / "sae.safetensors")})
    with pytest.raises(ValueError, match=r"sae.safetensors: W_dec has shape \(32, 16\) but the config implies \(64, 16\)"):
        load(folder)
    (folder / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae.safetensors is missing"):
        load(folder)
    with pytest.raises(FileNotFoundError, match="No SAE folder"):
        load(tmp_path / "nowhere")


def _grads_of(module, loss):
    return dict(zip(("W_enc", "b_enc", "W_dec", "b_pre"),
                    torch.autograd.grad(loss, [module.W_enc, module.b_enc, module.W_dec, module.b_pre])))


def _naive_reference(sae, x, dead, k_aux):
    """Loss and gradients of the same weights through the dense reference (``bench.NaiveTopK``)."""
    from saelib.bench import NaiveTopK

    naive = NaiveTopK({name: p.detach() for name, p in sae.named_parameters()}, sae.k, k_aux)
    loss = naive(x, dead)
    return loss, _grads_of(naive, loss)


# (n_latents, k, n_dead, k_aux): no AuxK; AuxK on the sparse kernels (k_aux < 1/8 of the dead) at a
# small and a large k_aux; AuxK on dense GEMMs over the dead rows; k = n (every latent kept) with AuxK
# over all of them
FAST_PATHS = [(64, 4, 0, 0), (256, 4, 128, 8), (4096, 4, 2048, 128), (64, 4, 16, 8), (32, 32, 32, 8)]


def _check_fast_path(n_latents, k, n_dead, k_aux, ties, device="cpu"):
    g = torch.Generator().manual_seed(n_latents + k)
    sae = make_sae(n_latents=n_latents, k=k).double()
    with torch.no_grad():
        sae.b_pre.copy_(0.1 * torch.randn(16, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(n_latents, generator=g))
    x = torch.randn(24, 16, generator=g, dtype=torch.float64)
    if ties:
        with torch.no_grad():  # latents 1 and 2 share an encoder row and a bias: equal pre-activations
            sae.W_enc[2] = sae.W_enc[1]
            sae.b_enc.zero_()  # rows of x at b_pre: every pre-activation ties at 0, whichever are kept
        x[:4] = sae.b_pre.detach()
        x[4:8] = 3 * sae.W_enc[1].detach() + sae.b_pre.detach()  # latents 1 and 2 tie at the top
    dead = torch.randperm(n_latents, generator=g)[:n_dead]
    dead = torch.zeros(n_latents, dtype=torch.bool).index_fill_(0, dead, True).to(device) if n_dead else None
    sae, x = sae.to(device), x.to(device)

    out = sae(x, dead, k_aux=k_aux or None)
    loss, reference = _naive_reference(sae, x, dead, k_aux)
    torch.testing.assert_close(out.loss, loss)
    for name, grad in _grads_of(sae, out.loss).items():
        torch.testing.assert_close(grad, reference[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n_latents, k, n_dead, k_aux", FAST_PATHS)
@pytest.mark.parametrize("ties", [False, True])
def test_every_fast_path_has_the_naive_dense_gradients(n_latents, k, n_dead, k_aux, ties):
    _check_fast_path(n_latents, k, n_dead, k_aux, ties)


def test_csr_patterns_with_sorted_columns_keep_the_gradients(monkeypatch):
    """The CUDA layout (each CSR row's columns increasing, as cuSPARSE assumes) run on the CPU, with
    PyTorch's check of every CSR matrix built: the CPU's own layout fails that check."""
    from saelib import kernels

    def checked(crow, cols, values, shape):
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=True)

    monkeypatch.setattr(kernels, "_csr", checked)
    with pytest.raises(RuntimeError, match="sorted"):
        _check_fast_path(4096, 4, 2048, 128, False)
    monkeypatch.setattr(kernels, "_sorts_columns", lambda indices: True)
    for n_latents, k, n_dead, k_aux in FAST_PATHS:
        for ties in (False, True):
            _check_fast_path(n_latents, k, n_dead, k_aux, ties)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_fast_path_has_the_naive_dense_gradients_on_the_gpu():
    for n_latents, k, n_dead, k_aux in FAST_PATHS:
        for ties in (False, True):
            _check_fast_path(n_latents, k, n_dead, k_aux, ties, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(8192, 4), (8192, 32), (4096, 256), (4096, 8192 // 8), (64, 64)])
def test_topk_through_group_maxima_keeps_torch_topk_values(n, k, dtype):
    from saelib.kernels import topk_indices

    pre = torch.randn(40, n, generator=torch.Generator().manual_seed(n + k)).to(dtype)
    pre[:10] = pre[:10].round()  # many ties, across the top-k boundary too
    pre[10] = 0.0
    indices = topk_indices(pre, min(k, n))
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "distinct latents per row"
    assert torch.equal(pre.gather(-1, indices), pre.topk(min(k, n), dim=-1).values)  # sorted, same values


def test_bf16_encoder_chooses_in_bf16_and_keeps_fp32_gradients():
    fp32, bf16 = make_sae(n_latents=256, k=8), make_sae(n_latents=256, k=8, encoder_dtype="bfloat16")
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::4] = True
    with torch.no_grad():  # biases 1 apart and small inputs: bf16 rounding (~0.4%) cannot change the choice
        for sae in (fp32, bf16):
            sae.b_enc.zero_()
            sae.b_enc[(~dead).nonzero()[:8, 0]] = 10.0 + torch.arange(8)  # the top-k of every token
            sae.b_enc[dead.nonzero()[:8, 0]] = 1.0 + torch.arange(8)  # AuxK's top-k_aux of the dead
    x = 0.1 * torch.randn(64, 16)
    out32, out16 = fp32(x, dead, k_aux=8), bf16(x, dead, k_aux=8)
    assert out16.latents.values.dtype == torch.float32 and out16.loss.dtype == torch.float32
    torch.testing.assert_close(out16.loss, out32.loss, rtol=1e-2, atol=0)
    for name, grad in _grads_of(bf16, out16.loss).items():
        reference = _grads_of(fp32, fp32(x, dead, k_aux=8).loss)[name]
        assert (grad - reference).norm() <= 2e-2 * reference.norm(), name  # bf16 rounding of the chosen values
    # given the same choice, the sparse backward does not depend on the precision of pre
    indices = out32.latents.indices
    x_c = (x - fp32.b_pre).detach().requires_grad_(True)
    with torch.no_grad():
        pre = torch.nn.functional.linear(x_c, fp32.W_enc, fp32.b_enc)
    g32 = torch.autograd.grad(gather_preacts(x_c, fp32.W_enc, fp32.b_enc, indices, pre).sum(), [x_c, fp32.W_enc])
    g16 = torch.autograd.grad(gather_preacts(x_c, fp32.W_enc, fp32.b_enc, indices, pre.bfloat16()).sum(), [x_c, fp32.W_enc])
    for a, b in zip(g16, g32):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_encoder_dtype_is_refused_naming_the_value():
    with pytest.raises(ValueError, match="'float16'"):
        make_sae(encoder_dtype="float16")


def _edited_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    ({"normalizer_scale": 0}, r"normalizer_scale is wrong \(input should be greater than 0, got 0\)"),
    ({"normalizer_scale": float("nan")}, r"normalizer_scale is wrong \(input should be a finite number, got nan\)"),
    ({"normalizer_scale": 1e300}, r"normalizer_scale is 1e\+300 but sae.safetensors was saved with 3.5"),
    ({"k": 5}, r"k is 5 but sae.safetensors was saved with 4"),
    ({"k": 65}, r"k is wrong \(k must be at most n_latents = 64, got 65\)"),
    ({"k": 4.0}, r"k is wrong \(input should be a valid integer, got 4.0\)"),
    ({"k": None}, r"k is wrong \(a topk SAE needs a positive integer k, got None\)"),
    ({"arch": "relu"}, r"arch is 'relu' but sae.safetensors was saved with 'topk'"),
    ({"arch": "gated"}, r"arch is wrong \(input should be 'topk', 'multitopk', 'batchtopk' or 'relu', got 'gated'\)"),
    ({"d_in": 17}, r"d_in is 17 but sae.safetensors was saved with 16"),
    ({"d_in": -1}, r"d_in is wrong \(input should be greater than 0, got -1\)"),
    ({"metadata": [1]}, r"metadata is wrong \(input should be an object, got \[1\]\)"),
    ({"metadata": {"layer": 4}}, r"metadata.layer is 4 but sae.safetensors was saved with 3"),
    ({"sha256": None}, r"sha256 is wrong \(input should be an object, got None\)"),
    ({"sha256": ...}, r"config.json has no sha256 of sae.safetensors \(got None\), which saelib records"),
    ({"sha256": {"sae.safetensors": "xyz"}}, r"sha256.sae.safetensors is wrong \(string should match pattern"),
    ({"extra": 1}, r"config.json has an unknown key extra \(= 1\)"),
])
def test_an_edited_config_is_one_sentence_naming_the_file_key_and_value(tmp_path, changes, match):
    folder = make_sae(normalizer=Normalizer(torch.zeros(16), 3.5), metadata={"layer": 3}).save(tmp_path / "sae")
    _edited_config(folder, **changes)
    with pytest.raises(ValueError, match=match) as info:
        load(folder)
    assert str(info.value).startswith(str(folder / "config.json")) and "\n" not in str(info.value)


def test_config_whitespace_and_key_order_do_not_matter(tmp_path):
    sae = make_sae()
    folder = sae.save(tmp_path / "sae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(reversed(config.items()))))
    assert load(folder).config() == sae.config()


def test_a_folder_from_before_checksums_still_loads(tmp_path):
    """No sha256 key in config.json and no config in the weights' header: a folder from an earlier
    saelib, checked by the schema only (a folder written now has both, and losing either is an error)."""
    sae = make_sae(normalizer=Normalizer(torch.randn(16), 2.0))
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({name: t.contiguous() for name, t in sae.state_dict().items()}, str(folder / "sae.safetensors"))
    config = sae.config()
    (folder / "config.json").write_text(json.dumps(config))
    assert load(folder).config() == config
    _edited_config(folder, k=0)
    with pytest.raises(ValueError, match=r"config.json: k is wrong \(input should be greater than 0, got 0\)"):
        load(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update(extra=torch.zeros(2)), r"sae.safetensors has an unknown tensor 'extra' besides W_enc"),
    (lambda t: t.pop("b_pre"), r"sae.safetensors has no tensor 'b_pre'"),
    (lambda t: t.update(b_pre=torch.zeros(16, dtype=torch.int32)), r"sae.safetensors: b_pre is a torch.int32 tensor"),
])
def test_extra_missing_or_mistyped_tensors_are_refused_by_name(tmp_path, edit, match):
    """Even with the checksum and header updated to match (a file rewritten on purpose)."""
    folder = make_sae().save(tmp_path / "sae")
    tensors = load_file(str(folder / "sae.safetensors"))
    edit(tensors)
    with safe_open(str(folder / "sae.safetensors"), "pt") as f:
        header = f.metadata()
    save_file(tensors, str(folder / "sae.safetensors"), metadata=header)
    _edited_config(folder, sha256={"sae.safetensors": sha256_file(folder / "sae.safetensors")})
    with pytest.raises(ValueError, match=match):
        load(folder)


def test_not_json_or_not_utf8_names_the_file(tmp_path):
    folder = make_sae().save(tmp_path / "sae")
    (folder / "config.json").write_bytes(b'{"arch": "topk", \xff}')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load(folder)
    (folder / "config.json").write_text("{'arch': 'topk'}")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(key must be a string"):
        load(folder)


def test_parameters_that_cannot_fit_are_refused_before_allocating():
    with pytest.raises(ValueError) as info:
        TopKSAE(576, 2**31, 32)
    message = str(info.value)
    assert "n_latents=2147483648 and d_in=576 needs 9,904,194,589,188 bytes" in message
    assert "of memory are available; choose a smaller n_latents." in message and message.count(". ") == 0


def test_the_cli_refuses_an_sae_that_cannot_fit_in_one_sentence(lm, tmp_path, monkeypatch, capsys):
    from saelib import cli, paths

    # a fresh cache root that shares only the converted model: the refusal comes before any extraction
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(paths.cache_dir("models"))
    monkeypatch.setenv("SAELIB_HOME", str(home))
    # the largest n_latents the config takes (a tensor dimension): the SAE's memory check refuses it
    assert cli.main(["train", "--preset", "ci", "--n-latents", "2147483647", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "n_latents=2147483647 and d_in=576 needs 9,904,194,584,576 bytes" in err and "Traceback" not in err
    assert not (home / "activations").exists() and not (tmp_path / "run").exists()
    assert cli.main(["train", "--preset", "ci", "--n-latents", "2147483648", "--out", str(tmp_path / "run")]) == 2
    assert "n_latents must be at most 2147483647" in capsys.readouterr().err  # refused by the config, before extraction


def test_the_loss_of_half_precision_input_is_the_float32_one():
    """float16's sums of squares overflow within a few tokens of raw activations (norms near 100)."""
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0)) * 10
    sae = TopKSAE(64, 256, 8)  # the identity normaliser of an imported peer SAE
    with torch.no_grad():
        full, outs = sae(x), {dtype: sae(x.to(dtype)) for dtype in (torch.float16, torch.bfloat16)}
    for out in outs.values():
        assert out.nmse.dtype == torch.float32
        assert float(out.nmse) == pytest.approx(float(full.nmse), rel=1e-3) and float(out.loss) == pytest.approx(float(full.loss), rel=1e-3)
