"""The optimised MetaXL step (:meth:`metaxl.meta.Learner.step`) against Algorithm 1 written plainly
(:func:`metaxl.reference.metaxl_sgd_step`), in float64 without dropout: the same phi and theta
after one step, to ~1e-10, on every code path of the optimised step; and a perturbed optimised
step must disagree, so that the comparison can fail."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, BertForTokenClassification

from metaxl import meta
from metaxl.config import TrainConfig
from metaxl.meta import Learner, param_depth, split_batch
from metaxl.reference import metaxl_sgd_step
from metaxl.rtn import RTNInjector

LR_THETA, LR_PHI, INNER_LR = 0.1, 0.2, 0.5  # a large inner lr makes the second-order term large


class _ConstSched:
    def step(self) -> None:
        pass


@dataclass
class Case:
    task: str = "ner"
    variant: str = "plain"
    layers: tuple[int, ...] = (2,)
    meta_batch: str = "separate"   # split: Learner.step halves the target batch itself
    frozen_embeddings: bool = False
    row_sparse: bool = True
    virtual_from_layer: int = 0
    source: bool = True
    scaler: bool = False            # the GradScaler (fp16) code path, here in float64
    inner_lr: float | None = INNER_LR  # None: the current main lr (the official code)
    max_grad_norm: float = 10.0
    cfg: dict = field(default_factory=dict)


CASES = {
    "ner-plain-L2": Case(),
    "sa-gated-L2": Case(task="sa", variant="gated"),
    "ner-gated-L0": Case(variant="gated", layers=(0,)),
    "sa-plain-L0-L2": Case(task="sa", layers=(0, 2)),
    "ner-split-meta-batch": Case(meta_batch="split"),
    "sa-gated-split-meta-batch": Case(task="sa", variant="gated", meta_batch="split"),
    "ner-frozen-embeddings": Case(frozen_embeddings=True, layers=(0, 2)),
    "sa-frozen-embeddings": Case(task="sa", variant="gated", frozen_embeddings=True),
    "ner-dense-embeddings": Case(row_sparse=False, layers=(0, 2)),
    "sa-gated-dense-embeddings": Case(task="sa", variant="gated", row_sparse=False),
    "ner-virtual-step-above-layer-2": Case(virtual_from_layer=2),
    "ner-inner-lr-is-main-lr": Case(inner_lr=None),
    "ner-clipped": Case(max_grad_norm=0.05),
    "ner-no-source-batch": Case(source=False),
    "ner-gradscaler": Case(scaler=True, layers=(0, 2)),
    "sa-gated-gradscaler-split": Case(task="sa", variant="gated", scaler=True, meta_batch="split"),
}


def build(case: Case, seed: int = 0):
    """A tiny float64 model with padding in its batches (row-sparse embeddings see padding rows and
    rows shared between the source and meta batches), its RTNs, a Learner and the batches."""
    torch.manual_seed(seed)
    cls = BertForTokenClassification if case.task == "ner" else BertForSequenceClassification
    model = cls(tiny_bert_config(num_labels=3, pad_token_id=0)).double().eval()
    if case.frozen_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    injector = RTNInjector(model, list(case.layers), variant=case.variant, hidden=3).double()
    cfg = TrainConfig(method="metaxl", inner_lr=case.inner_lr, virtual_from_layer=case.virtual_from_layer,
                      max_grad_norm=case.max_grad_norm, meta_batch=case.meta_batch, **case.cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if case.scaler else None
    learner = Learner(model, injector, cfg, torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                            lr=LR_THETA), _ConstSched(),
                      torch.optim.SGD(injector.parameters(), lr=LR_PHI), _ConstSched(), contextlib.nullcontext, scaler)
    learner.row_sparse_embeddings = case.row_sparse
    g = torch.Generator().manual_seed(seed + 1)

    def batch(n: int, length: int = 7) -> dict[str, torch.Tensor]:
        ids = torch.randint(4, 64, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, -2:], ids[0, -2:] = 0, 0
        if case.task == "ner":
            labels = torch.randint(0, 3, (n, length), generator=g)
            labels[mask == 0] = -100
        else:
            labels = torch.randint(0, 3, (n,), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    src, tgt, meta_batch = batch(3), batch(2), batch(2)
    meta_batch["input_ids"][1, :3] = src["input_ids"][1, :3]  # rows shared by the source and meta batches
    return model, injector, learner, (src if case.source else None), tgt, meta_batch


def optimised_and_reference(case: Case):
    """phi and theta after one Learner.step, and after one step of the reference, by name."""
    model, injector, learner, src, tgt, meta_batch = build(case)
    if case.meta_batch == "split":  # Learner.step splits a target batch of four into halves
        whole = {k: torch.cat([tgt[k], meta_batch[k]]) for k in tgt}
        tgt, meta_batch = split_batch(whole)
    depth = meta.num_layers(model)
    virtual = {n for n, _ in model.named_parameters() if param_depth(n, depth) >= case.virtual_from_layer}
    theta_ref, phi_ref = metaxl_sgd_step(
        model, injector, src, tgt, meta_batch, inner_lr=LR_THETA if case.inner_lr is None else case.inner_lr,
        lr_theta=LR_THETA, lr_phi=LR_PHI, virtual=virtual, max_grad_norm=case.max_grad_norm)
    if case.meta_batch == "split":
        learner.step(src, 0, whole)
    else:
        learner.step(src, 0, tgt, meta_batch)
    theta = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    phi = {n: p.detach() for n, p in injector.named_parameters()}
    return (theta, phi), (theta_ref, phi_ref), (model, injector)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-10, msg=lambda m, n=n: f"{what} {n}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_optimised_step_equals_algorithm_1(name):
    case = CASES[name]
    (theta, phi), (theta_ref, phi_ref), (model, injector) = optimised_and_reference(case)
    assert_same(phi, phi_ref, "phi")
    assert_same(theta, theta_ref, "theta")
    # not a vacuous comparison: both moved, phi by a hypergradient that is not ~0 (except without source)
    start_model, start_injector, *_ = build(case)
    def moved(a, b):
        return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    moved_phi, moved_theta = moved(injector, start_injector), moved(model, start_model)
    assert moved_theta > 1e-4
    if case.source:
        assert moved_phi > 1e-6, "degenerate case: phi did not move"
    else:
        assert moved_phi == 0.0, "without a source batch phi has no gradient"
    if case.frozen_embeddings:
        emb = "bert.embeddings.word_embeddings.weight"
        assert emb not in theta and torch.equal(dict(model.named_parameters())[emb],
                                                dict(start_model.named_parameters())[emb])


_MIXED_TERM, _VIRTUAL_STEP = meta.mixed_term, meta.virtual_step


def _flip_mixed_term(grads, cotangents, phi):
    return tuple(None if d is None else -d for d in _MIXED_TERM(grads, cotangents, phi))


def _virtual_step_off_by_1e_6(base, g_src, g_tgt, lrs):
    return _VIRTUAL_STEP(base, g_src, g_tgt, [lr * (1 + 1e-6) for lr in lrs])


@pytest.mark.parametrize("perturbation,case_name", [
    ("hypergradient-sign", "ner-plain-L2"),
    ("hypergradient-sign", "sa-gated-split-meta-batch"),
    ("hypergradient-sign", "ner-gradscaler"),
    ("virtual-step-lr", "ner-plain-L2"),
    ("virtual-step-lr", "ner-dense-embeddings"),
    ("theta-step-at-old-phi", "sa-gated-L2"),
])
def test_a_perturbed_optimised_step_disagrees(monkeypatch, perturbation, case_name):
    """The comparison catches errors: a hypergradient of the wrong sign, a virtual step at a
    slightly wrong lr, or theta's step on the gradient at the old phi (``reuse_source_gradient``,
    an opt-in approximation) each give a step that the reference does not."""
    case = CASES[case_name]
    if perturbation == "hypergradient-sign":
        monkeypatch.setattr(meta, "mixed_term", _flip_mixed_term)
    elif perturbation == "virtual-step-lr":
        monkeypatch.setattr(meta, "virtual_step", _virtual_step_off_by_1e_6)
    else:
        case = Case(**{**case.__dict__, "cfg": {"reuse_source_gradient": True}})
    (theta, phi), (theta_ref, phi_ref), _ = optimised_and_reference(case)
    if perturbation == "theta-step-at-old-phi":
        assert_same(phi, phi_ref, "phi")  # phi's step is untouched by the option
        with pytest.raises(AssertionError):
            assert_same(theta, theta_ref, "theta")
    else:
        with pytest.raises(AssertionError):
            assert_same(phi, phi_ref, "phi")


def test_reference_hypergradient_matches_finite_differences():
    """The reference itself against central finite differences of the meta objective
    F(phi) = L_meta(theta - a grad_theta L_train(theta, phi)) (test_meta's, computed from scratch):
    phi's step of the reference is -lr_phi times the derivative of F."""
    from test_meta import A, fd_hypergrad

    assert A == INNER_LR
    case = Case(layers=(0, 2))
    model, injector, learner, src, tgt, meta_batch = build(case)
    _, phi_ref = metaxl_sgd_step(model, injector, src, tgt, meta_batch, inner_lr=INNER_LR, lr_theta=LR_THETA,
                                 lr_phi=LR_PHI)
    hyper = torch.cat([((p.detach() - phi_ref[n]) / LR_PHI).reshape(-1) for n, p in injector.named_parameters()])
    reference = fd_hypergrad(model, injector, learner, src, tgt, meta_batch)
    assert reference.norm() > 1e-6, "degenerate test: the hypergradient is ~0"
    assert float((hyper - reference).norm() / reference.norm()) < 1e-4
