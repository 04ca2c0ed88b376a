"""The tiny planted-shift experiment shared by tests/test_planted_shift.py (see metaxl.planted)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from conftest import tiny_bert_config
from transformers import BertForTokenClassification

from metaxl.config import TrainConfig
from metaxl.meta import Learner, batch_loss
from metaxl.planted import PlantedShift, reflection
from metaxl.rtn import RTNInjector
from metaxl.train import phi_optimizer

VOCAB, LENGTH, DIM, LAYERS, LABELS = 64, 8, 16, 2, 5


def make_batch(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids with a fixed labelling rule (id mod 3): the same task in source and target."""
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % LABELS}


def pretrain(model: BertForTokenClassification, g: torch.Generator, steps: int = 150) -> None:
    """Train on plenty of unshifted data, then start a fresh head: informative fixed features."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch_loss(model, make_batch(20, g)).backward()
        opt.step()
        opt.zero_grad()
    torch.nn.init.normal_(model.classifier.weight, std=0.02)
    torch.nn.init.zeros_(model.classifier.bias)


@dataclass
class Outcome:
    dev_loss: float
    distance_before: float
    distance_after: float
    shift_after: float
    norm_ratio: float
    """Mean ||RTN(M h)|| / ||h|| at the end (1 without an RTN)."""


def run(method: str, meta_lr: float = 1e-2, steps: int = 300, seed: int = 0, flip_sign: bool = False,
        n_target: int = 10, freeze_encoder: bool = True, lr: float = 3e-2, flip: int = 12, **overrides) -> Outcome:
    torch.manual_seed(seed)
    model = BertForTokenClassification(tiny_bert_config(num_labels=LABELS, vocab_size=VOCAB, hidden_size=DIM,
                                                        num_hidden_layers=LAYERS))
    settings = dict(rtn_init="identity", rtn_hidden=2 * DIM, meta_batch="separate", hypergrad_scale="inverse-lr",
                    diagnostics_every=0)
    cfg = TrainConfig(method=method, lr=lr, meta_lr=meta_lr, **{**settings, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    if freeze_encoder:  # a "pre-trained" encoder whose features are what they are: the head (and RTN) adapt
        pretrain(model, g)
        model.bert.requires_grad_(False)
    cfg.validate()
    injector = None
    opt_phi = None
    if method == "metaxl":
        injector = RTNInjector(model, [LAYERS], "gated", cfg.rtn_hidden, init=cfg.rtn_init,
                               preserve_norm=cfg.rtn_norm == "preserve")
        opt_phi = phi_optimizer(injector.parameters(), cfg, meta_lr)
    opt_theta = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    const = torch.optim.lr_scheduler.LambdaLR(opt_theta, lambda _: 1.0)
    const_phi = torch.optim.lr_scheduler.LambdaLR(opt_phi, lambda _: 1.0) if opt_phi is not None else None
    learner = Learner(model, injector, cfg, opt_theta, const, opt_phi, const_phi, contextlib.nullcontext)
    shift = PlantedShift(model, LAYERS, reflection(DIM, flip, seed=seed))
    shift.install(learner)
    if flip_sign:  # the hypergradient with the wrong sign: the test must then fail
        real = learner._hypergradient

        def flipped(*a, **k):
            phi_grads, *rest = real(*a, **k)
            return [-d for d in phi_grads], *rest

        learner._hypergradient = flipped  # type: ignore[method-assign]
    dev = make_batch(200, g)
    target = make_batch(n_target, g)  # the low-resource target: a few sentences, drawn from again and again

    def target_batch() -> dict[str, torch.Tensor]:
        pick = torch.randint(0, n_target, (10,), generator=g)
        return {k: v[pick] for k, v in target.items()}

    probe_h = shift.hidden(model, dev)
    before = shift.distance(injector, probe_h)
    model.train()
    for _ in range(steps):
        learner.step(make_batch(10, g), 0, target_batch(), target_batch() if method == "metaxl" else None)
    model.eval()
    with torch.no_grad():
        dev_loss = float(batch_loss(model, dev))
    h = shift.hidden(model, dev)
    with torch.no_grad():
        out = shift.apply(h) if injector is None else injector.rtns[injector.key(0, LAYERS)](shift.apply(h))
        ratio = float((out.norm(dim=-1) / h.norm(dim=-1)).mean())
    return Outcome(dev_loss, before, shift.distance(injector, h), shift.distance(None, h), ratio)
