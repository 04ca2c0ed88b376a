"""Algorithm 1 of the paper (Xia et al., NAACL 2021) as one plain function, to read next to it.

:func:`metaxl_sgd_step` is the specification that the optimised :meth:`metaxl.meta.Learner.step`
(method ``metaxl``, exact hypergradient) is tested against in float64 (tests/test_reference.py):
the same phi and theta after one step. It computes the exact hypergradient with second-order
autograd and nothing else: no kept gradients, no row-sparse embeddings, no fused kernels, no
distributed averaging. It is slow by design; use the :class:`~metaxl.meta.Learner` to train.

>>> import torch
>>> from transformers import BertConfig, BertForSequenceClassification
>>> from metaxl.rtn import RTNInjector
>>> torch.manual_seed(0) and None
>>> model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
...     num_attention_heads=2, intermediate_size=8, num_labels=2, hidden_dropout_prob=0.0,
...     attention_probs_dropout_prob=0.0)).double()
>>> rtn = RTNInjector(model, [1], variant="plain", hidden=2).double()
>>> batch = lambda n: {"input_ids": torch.randint(1, 30, (n, 5)), "labels": torch.randint(0, 2, (n,))}
>>> theta, phi = metaxl_sgd_step(model, rtn, batch(2), batch(2), batch(2), inner_lr=0.5, lr_theta=0.1, lr_phi=0.1)
>>> sorted(phi) == sorted(n for n, _ in rtn.named_parameters()), len(theta) == len(list(model.parameters()))
(True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Container

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .rtn import RTNInjector

Batch = dict[str, torch.Tensor]
Params = dict[str, torch.Tensor]


class _WithRTN(nn.Module):
    """The model and the RTNs as one module, so that ``functional_call`` substitutes theta and phi."""

    def __init__(self, model: nn.Module, injector: RTNInjector) -> None:
        super().__init__()
        self.model, self.rtn = model, injector

    def forward(self, batch: Batch, source: int | None) -> torch.Tensor:
        with self.rtn.applied(source) if source is not None else contextlib.nullcontext():
            return self.model(**batch).loss


def metaxl_sgd_step(model: nn.Module, injector: RTNInjector, src: Batch | None, tgt: Batch | None, meta: Batch, *,
                    inner_lr: float, lr_theta: float, lr_phi: float, virtual: Container[str] | None = None,
                    max_grad_norm: float | None = None, source: int = 0) -> tuple[Params, Params]:
    """One step of Algorithm 1 with plain SGD; returns the new ``(theta, phi)`` by parameter name
    (``theta``: the model's trainable parameters, ``phi``: the injector's). Nothing is modified.

    1. ``L_train(theta, phi) = L_src(theta, phi) + L_tgt(theta)``: the source batch through the
       RTN g_phi, the target batch without it;
    2. virtual step ``theta' = theta - inner_lr * grad_theta L_train`` (on the parameters named in
       ``virtual``, all of theta when None), kept differentiable in phi;
    3. ``phi <- phi - lr_phi * d L_meta(theta'(phi)) / d phi`` on the target meta batch;
    4. ``theta <- theta - lr_theta * grad_theta L_train(theta, phi_new)``, the gradient clipped to
       ``max_grad_norm`` as ``torch.nn.utils.clip_grad_norm_`` does.
    """
    net = _WithRTN(model, injector)
    theta = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    phi = {n: p.detach().requires_grad_() for n, p in injector.named_parameters()}

    def loss(th: Params, ph: Params, batch: Batch, source: int | None) -> torch.Tensor:
        params = {**{f"model.{n}": t for n, t in th.items()}, **{f"rtn.{n}": t for n, t in ph.items()}}
        return functional_call(net, params, args=(batch, source), strict=False)

    def train_loss(th: Params, ph: Params) -> torch.Tensor:  # (1) L_src through the RTN + L_tgt
        parts = [loss(th, ph, src, source)] if src is not None else []
        return sum(parts + ([loss(th, ph, tgt, None)] if tgt is not None else []))  # type: ignore[return-value]

    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
        # (2) the virtual step, differentiable in phi (create_graph)
        names = [n for n in theta if virtual is None or n in virtual]
        grads = torch.autograd.grad(train_loss(theta, phi), [theta[n] for n in names], create_graph=True,
                                    allow_unused=True)
        stepped = {n: theta[n] - inner_lr * g for n, g in zip(names, grads, strict=True) if g is not None}
        theta_prime = {**theta, **stepped}
        # (3) the exact hypergradient d L_meta(theta'(phi)) / d phi, and phi's SGD step
        hyper = torch.autograd.grad(loss(theta_prime, phi, meta, None), list(phi.values()), allow_unused=True)
    new_phi = {n: (p if h is None else p - lr_phi * h).detach() for (n, p), h in zip(phi.items(), hyper, strict=True)}
    # (4) theta's SGD step on L_train at the new phi, the gradient clipped
    grads = torch.autograd.grad(train_loss(theta, new_phi), list(theta.values()), allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(theta.values(), grads, strict=True))
    if max_grad_norm is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        grads = tuple(g * torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) for g in grads)
    new_theta = {n: (p - lr_theta * g).detach() for (n, p), g in zip(theta.items(), grads, strict=True)}
    return new_theta, new_phi
