"""The implementations timed side by side, each built as ``step(x) -> loss`` (the loss before the
update): saelib's own trainer step, EleutherAI's sparsify, SAELens, a naive dense step and the GEMM
roofline. A peer that is not installed raises :class:`Unavailable`, saying what to install."""

from __future__ import annotations

import time
from importlib import metadata
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TrainConfig
from ..kernels import fast_bf16
from ..sae import TopKSAE, nmse
from ..train import make_optimizer, train_step
from ..version import __version__
from .cases import ADAM_EPS, AUXK_COEF, GRAD_CLIP, IMPLS, INSTALL_PEERS, BenchConfig


# ---- the implementations: each is ``step(x) -> loss`` (the loss before the update) ------------


class Unavailable(Exception):
    """An implementation cannot run here; the message says why and what to do."""


class Step:
    """``step(x) -> loss`` (the loss before the update) of one implementation; ``optimizer`` is the
    one a learning-rate schedule sets, ``model`` the module it trains (None for the roofline)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer | None = None,
                 model: nn.Module | None = None):
        self.fn, self.optimizer, self.model = fn, optimizer, model

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def measure(step: Step, batches: list[Tensor], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run ``warmup`` then ``steps`` timed steps cycling over ``batches``; (seconds per step, losses)."""
    times, losses = [], []
    for i in range(warmup + steps):
        x = batches[i % len(batches)]
        start = time.perf_counter()
        loss = float(step(x))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    return times, losses


def _saelib(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None, encoder_dtype: str = "float32") -> Step:
    device = w["W_enc"].device
    if encoder_dtype == "bfloat16" and not fast_bf16(device):
        missing = "this GPU has no fast bf16 matmul" if device.type == "cuda" else "this CPU has no fast bf16 matmul (AMX or AVX512_BF16)"
        raise Unavailable(f"{missing}: fp32 stays the default here")
    sae = TopKSAE(cfg.d_in, cfg.n_latents, cfg.k, encoder_dtype=encoder_dtype).to(device)
    sae.load_state_dict({**sae.state_dict(), **w})
    train_cfg = TrainConfig(n_latents=cfg.n_latents, k=cfg.k, batch_size=cfg.batch_size, auxk=dead is not None,
                            k_aux=cfg.k_aux, lr=cfg.lr(), adam_eps=ADAM_EPS, grad_clip=GRAD_CLIP, l1_coef=0.0,
                            encoder_dtype=encoder_dtype)
    opt = make_optimizer(sae, train_cfg)

    def step(x: Tensor) -> Tensor:
        return train_step(sae, opt, x, dead, train_cfg).loss.detach()

    return Step(step, opt, sae)


class NaiveTopK(nn.Module):
    """The saelib recipe with dense ops: the code is a ``(B, n_latents)`` matrix."""

    def __init__(self, w: dict[str, Tensor], k: int, k_aux: int):
        super().__init__()
        self.k, self.k_aux = k, k_aux
        for name, t in w.items():
            setattr(self, name, nn.Parameter(t.clone()))

    def forward(self, x: Tensor, dead: Tensor | None) -> Tensor:
        x_c = x - self.b_pre
        pre = x_c @ self.W_enc.T + self.b_enc
        top = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        x_hat = z @ self.W_dec + self.b_pre
        loss = nmse(x, x_hat)
        if dead is not None:
            aux = pre.masked_fill(~dead, float("-inf")).topk(self.k_aux, dim=-1)
            z_aux = torch.zeros_like(pre).scatter(-1, aux.indices, F.relu(aux.values))
            loss = loss + AUXK_COEF * nmse((x - x_hat).detach(), z_aux @ self.W_dec)
        return loss


def _naive(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None) -> Step:
    model = NaiveTopK(w, cfg.k, cfg.k_aux)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr(), eps=ADAM_EPS)

    def step(x: Tensor) -> Tensor:
        loss = model(x, dead)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            model.W_dec.grad -= (model.W_dec.grad * model.W_dec).sum(-1, keepdim=True) * model.W_dec
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return loss.detach()

    return Step(step, opt, model)


def _import(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise Unavailable(f"{package} not installed ({error}): {INSTALL_PEERS}") from None


def _sparsify(cfg: BenchConfig, w: dict[str, Tensor] | None, dead: Tensor | None, lr: float | None = None,
              optimizer: str = "adam", device: str = "cpu") -> Step:
    """``w=None`` keeps sparsify's own init; ``optimizer="signum"`` is its trainer's default (sign
    SGD in a schedule-free wrapper, momentum 0.95), ``"adam"`` its Adam option."""
    _import("sparsify", "eai-sparsify")
    from sparsify import SparseCoder, SparseCoderConfig

    device = w["W_enc"].device if w is not None else torch.device(device)
    sae = SparseCoder(cfg.d_in, SparseCoderConfig(num_latents=cfg.n_latents, k=cfg.k), device=device)
    if w is not None:
        with torch.no_grad():
            sae.encoder.weight.copy_(w["W_enc"])
            sae.encoder.bias.copy_(w["b_enc"])
            sae.W_dec.copy_(w["W_dec"])
            sae.b_dec.copy_(w["b_pre"])
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=lr), momentum=0.95)
        opt.train()
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=lr or cfg.lr())
    auxk_alpha = AUXK_COEF if dead is not None else 0.0

    def step(x: Tensor) -> Tensor:
        # sparsify's Trainer.fit, one step: renormalise, forward, backward, project, Adam
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        loss = out.fvu + auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return Step(step, opt, sae)


def _sae_lens(cfg: BenchConfig, w: dict[str, Tensor] | None, dead: Tensor | None, sparse: bool = False,
              lr: float | None = None, device: str = "cpu") -> Step:
    """``w=None`` keeps SAELens' own init; Adam with its trainer's default betas (0.9, 0.999)."""
    _import("sae_lens", "sae-lens")
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    device = str(w["W_enc"].device) if w is not None else device
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cfg.d_in, d_sae=cfg.n_latents, k=cfg.k, use_sparse_activations=sparse,
                                                device=device))
    if w is not None:
        with torch.no_grad():
            sae.W_enc.copy_(w["W_enc"].T)
            sae.b_enc.copy_(w["b_enc"])
            sae.W_dec.copy_(w["W_dec"])
            sae.b_dec.copy_(w["b_pre"])
    opt = torch.optim.Adam(sae.parameters(), lr=lr or cfg.lr())
    sae.train()

    def step(x: Tensor) -> Tensor:
        # SAETrainer._train_step without its logging and firing statistics
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        nn.utils.clip_grad_norm_(sae.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad()
        return out.loss.detach()

    return Step(step, opt, sae)


def _roofline(cfg: BenchConfig, w: dict[str, Tensor], dead: Tensor | None, dtype: torch.dtype = torch.float32) -> Step:
    """The encoder GEMM alone, in ``dtype`` (bf16: the bound of the ``saelib-bf16`` step)."""
    if dtype == torch.bfloat16 and not fast_bf16(w["W_enc"].device):
        raise Unavailable("no fast bf16 matmul here (AMX or a GPU): the bf16 roofline is not measured")
    W_enc, b_enc = w["W_enc"].to(dtype), w["b_enc"].to(dtype)

    def step(x: Tensor) -> Tensor:
        with torch.no_grad():
            return F.linear(x.to(dtype), W_enc, b_enc)[0, 0]

    return Step(step)


BUILDERS: dict[str, Callable[[BenchConfig, dict, Tensor | None], Step]] = {
    "saelib": _saelib,
    "saelib-bf16": lambda cfg, w, dead: _saelib(cfg, w, dead, encoder_dtype="bfloat16"),
    "sparsify": _sparsify,
    "sae-lens": _sae_lens,
    "sae-lens-sparse": lambda cfg, w, dead: _sae_lens(cfg, w, dead, sparse=True),
    "naive": _naive,
    "roofline": _roofline,
    "roofline-bf16": lambda cfg, w, dead: _roofline(cfg, w, dead, torch.bfloat16),
}


def make_step(impl: str, cfg: BenchConfig, weights: dict[str, Tensor], dead: Tensor | None) -> Step:
    """``step(x) -> loss`` for ``impl`` starting from ``weights``; raises ``Unavailable`` with the reason."""
    if impl not in BUILDERS:
        raise ValueError(f"Unknown impl {impl!r}; choose from {', '.join(IMPLS)}.")
    return BUILDERS[impl](cfg, weights, dead)


def _version(impl: str) -> str | None:
    package = {"saelib": None, "saelib-bf16": None, "sparsify": "eai-sparsify", "sae-lens": "sae-lens", "sae-lens-sparse": "sae-lens"}.get(impl, "torch")
    if package is None:
        return __version__
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
