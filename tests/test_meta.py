"""The MetaXL hypergradient against independent estimates, on a tiny float64 model."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification, BertForTokenClassification

from metaxl.config import TrainConfig
from metaxl.meta import Learner, batch_loss, enable_gradient_checkpointing, param_depth, split_batch
from metaxl.rtn import RTNInjector

A = 0.5  # a large inner lr makes the second-order term large, so errors show


class _ConstSched:
    def step(self) -> None:
        pass


def _setup(variant="plain", layers=(2,), task="ner", hypergrad="exact", virtual_from_layer=0, seed=0, detach=True):
    torch.manual_seed(seed)
    cls = BertForTokenClassification if task == "ner" else BertForSequenceClassification
    model = cls(tiny_bert_config(num_labels=3)).double().eval()
    inj = RTNInjector(model, list(layers), variant=variant, hidden=2, detach_input=detach).double()
    cfg = TrainConfig(method="metaxl", inner_lr=A, hypergrad=hypergrad, virtual_from_layer=virtual_from_layer,
                      fd_epsilon=1e-3)
    opt_t = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(inj.parameters(), lr=0.1)
    learner = Learner(model, inj, cfg, opt_t, _ConstSched(), opt_p, _ConstSched(), contextlib.nullcontext)
    g = torch.Generator().manual_seed(seed + 1)

    def batch(n, length=6):
        ids = torch.randint(4, 64, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, -2:] = 0
        if task == "ner":
            labels = torch.randint(0, 3, (n, length), generator=g)
            labels[mask == 0] = -100
        else:
            labels = torch.randint(0, 3, (n,), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return model, inj, learner, batch(3), batch(2), batch(2)


def with_dropout(model, p):
    """Set every dropout of ``model`` to ``p`` (the tiny config has none, so masks do not matter)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def meta_objective(model, inj, learner, src, tgt, meta, names, lrs=None):
    """F(phi) = L_meta(theta - a * grad_theta L_train(theta, phi)), computed from scratch
    (``lrs``: a per-parameter virtual-step lr by name instead of A)."""
    theta = {n: p for n, p in model.named_parameters()}
    params = [theta[n] for n in names]
    loss = learner.train_loss(src, 0, tgt)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    prime = {n: p.detach() - (A if lrs is None else lrs[n]) * (torch.zeros_like(p) if gi is None else gi)
             for n, p, gi in zip(names, params, g, strict=True)}
    with torch.no_grad():
        return float(batch_loss(model, meta, prime))


def fd_hypergrad(model, inj, learner, src, tgt, meta, h=1e-5, lrs=None):
    """Central finite differences of F over every RTN coordinate (independent of meta.py's maths)."""
    out = []
    for p in inj.parameters():
        grad = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + h
            fp = meta_objective(model, inj, learner, src, tgt, meta, learner.virtual_names, lrs)
            flat[i] = orig - h
            fm = meta_objective(model, inj, learner, src, tgt, meta, learner.virtual_names, lrs)
            flat[i] = orig
            grad.view(-1)[i] = (fp - fm) / (2 * h)
        out.append(grad)
    return torch.cat([g.view(-1) for g in out])


@pytest.mark.parametrize("variant,layers,task,detach", [
    ("plain", (0, 2), "ner", True),
    ("gated", (2,), "sa", True),        # the official RTN: exact for one RTN
    ("gated", (0, 2), "sa", False),     # several gated RTNs: exact once the branch input is not detached
])
def test_exact_hypergradient_matches_finite_differences(variant, layers, task, detach):
    model, inj, learner, src, tgt, meta = _setup(variant, layers, task, detach=detach)
    exact, _ = learner.hypergradient(src, 0, tgt, meta)
    exact = torch.cat([g.reshape(-1) for g in exact])
    reference = fd_hypergrad(model, inj, learner, src, tgt, meta)
    assert reference.norm() > 1e-6, "degenerate test: the hypergradient is ~0"
    rel = (exact - reference).norm() / reference.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_exact_hypergradient_with_partial_virtual_step():
    model, inj, learner, src, tgt, meta = _setup("plain", (2,), "ner", virtual_from_layer=2)
    assert all(param_depth(n, 2) >= 2 for n in learner.virtual_names)
    assert len(learner.virtual_names) < len(learner.theta)
    exact, _ = learner.hypergradient(src, 0, tgt, meta)
    exact = torch.cat([g.reshape(-1) for g in exact])
    reference = fd_hypergrad(model, inj, learner, src, tgt, meta)
    assert (exact - reference).norm() / reference.norm() < 1e-4


@pytest.mark.parametrize("layers,task", [((2,), "ner"), ((0, 2), "sa")])
def test_finite_difference_mode_agrees_with_exact(layers, task):
    """DARTS-style differences of grad_phi along g' approximate the exact mixed term.

    Only for the plain RTN: the gated RTN reads h.detach() (as the official code), so autograd's
    theta-gradient is a stop-gradient pseudo-gradient whose phi-derivative is not the symmetric
    mixed second derivative that finite differences estimate (documented in docs/method.md).
    """
    model, inj, learner, src, tgt, meta = _setup("plain", layers, task)
    exact = torch.cat([g.reshape(-1) for g in learner.hypergradient(src, 0, tgt, meta)[0]])
    learner.cfg.hypergrad = "finite-difference"
    approx = torch.cat([g.reshape(-1) for g in learner.hypergradient(src, 0, tgt, meta)[0]])
    cos = torch.nn.functional.cosine_similarity(exact, approx, dim=0)
    assert cos > 0.99, f"cosine {cos:.4f}"


@pytest.mark.parametrize("path", ["split", "gradscaler"])
def test_finite_differences_replay_the_dropout_masks(path):
    """In training mode the two shifted forwards of finite differences must draw the dropout masks
    of the forward that gave g (else their difference, divided by 2 eps, is mask noise: cosine
    with the exact hypergradient ~0.1 before the fix); with them, FD agrees with exact (plain RTN).
    ``gradscaler``: with a GradScaler (the fp16 code path), here in float64."""
    model, inj, learner, src, tgt, meta = _setup("plain", (0, 2), "ner")
    with_dropout(model, 0.2)
    model.train()
    learner.cfg.fd_epsilon = 1e-4

    def hypergradient(mode, seed):
        learner.cfg.hypergrad = mode
        torch.manual_seed(seed)
        learner.scaler = torch.amp.GradScaler("cpu") if path == "gradscaler" else None
        return torch.cat([g.reshape(-1) for g in learner.hypergradient(src, 0, tgt, meta)[0]])

    cos = torch.nn.functional.cosine_similarity
    for seed in range(3):
        exact, fd = hypergradient("exact", seed), hypergradient("finite-difference", seed)
        assert cos(exact, fd, dim=0) > 0.99, f"seed {seed}: cosine {cos(exact, fd, dim=0):.4f}"
        other_masks = hypergradient("exact", seed + 100)
        assert cos(exact, other_masks, dim=0) < 0.99, "degenerate test: dropout does not change the hypergradient"


def test_meta_update_changes_only_phi_then_theta_step_uses_new_phi():
    model, inj, learner, src, tgt, meta = _setup("plain", (2,), "ner")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi0 = [p.detach().clone() for p in inj.parameters()]
    phi_grads, _ = learner.hypergradient(src, 0, tgt, meta)
    # the hypergradient computation leaves every parameter untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, theta0[n]), n
    for p, p0 in zip(inj.parameters(), phi0, strict=True):
        assert torch.equal(p, p0)
    # a full step: phi moves by -lr * hypergradient exactly (SGD), theta moves too
    learner.metaxl_step(src, 0, tgt, meta)
    for p, p0, d in zip(inj.parameters(), phi0, phi_grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * d)
    assert any(not torch.equal(p, theta0[n]) for n, p in model.named_parameters())


def test_meta_update_does_not_touch_theta_grads_or_values():
    """Step (2) of Algorithm 1 updates phi only: after the phi step theta is unchanged."""
    model, inj, learner, src, tgt, meta = _setup("gated", (2,), "sa")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi_grads, _ = learner.hypergradient(src, 0, tgt, meta)
    for p, d in zip(inj.parameters(), phi_grads, strict=True):
        p.grad = d
    learner.opt_phi.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, theta0[n]), n
        assert p.grad is None, f"{n} got a gradient from the meta update"


def test_rtn_changes_source_forward_only():
    model, inj, learner, src, tgt, meta = _setup("plain", (2,), "ner")
    with torch.no_grad():
        plain = model(**src).logits
        with inj.applied():
            through = model(**src).logits
        after = model(**src).logits
    assert not torch.allclose(plain, through)
    assert torch.equal(plain, after)
    # the training loss routes only the source batch through the RTN
    with torch.no_grad():
        l_tgt_alone = batch_loss(model, tgt)
        with inj.applied():
            l_src_rtn = batch_loss(model, src)
        total = learner.train_loss(src, 0, tgt)
    torch.testing.assert_close(total, l_src_rtn + l_tgt_alone)


def test_zero_inner_lr_gives_zero_hypergradient():
    model, inj, learner, src, tgt, meta = _setup("plain", (2,), "ner")
    learner.cfg.inner_lr = 0.0
    grads, _ = learner.hypergradient(src, 0, tgt, meta)
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_split_batch_halves():
    b = {"input_ids": torch.arange(10).view(5, 2)}
    first, second = split_batch(b)
    assert first["input_ids"].shape[0] == 2 and second["input_ids"].shape[0] == 3
    with pytest.raises(ValueError):
        split_batch({"input_ids": torch.zeros(1, 2)})


@pytest.mark.parametrize("hypergrad", ["exact", "finite-difference"])
@pytest.mark.parametrize("layers", [(1, 2), (0,)])
def test_gradient_checkpointing_gives_the_same_hypergradient(hypergrad, layers):
    """Recomputed activations (use_reentrant=False) support the double backward of the exact mode."""
    model, inj, learner, src, tgt, meta = _setup(layers=layers, hypergrad=hypergrad)
    model.train()  # HF checkpoints only in training mode; the tiny config has no dropout
    plain, loss_plain = learner.hypergradient(src, 0, tgt, meta)
    enable_gradient_checkpointing(model, inj)
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    ckpt, loss_ckpt = learner.hypergradient(src, 0, tgt, meta)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-12)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in plain)


@pytest.mark.parametrize("variant,layers,task,hypergrad,vfl", [
    ("plain", (0, 2), "ner", "exact", 0),
    ("gated", (2,), "sa", "exact", 0),
    ("plain", (0, 2), "ner", "finite-difference", 0),
    ("gated", (2,), "sa", "finite-difference", 0),
])
def test_row_sparse_embedding_step_equals_the_dense_one(variant, layers, task, hypergrad, vfl):
    """The word embeddings' virtual step on the batches' rows only is exact: same hypergradient,
    meta loss and parameters after a full step as the dense virtual step."""
    import copy

    model, inj, sparse, src, tgt, meta = _setup(variant, layers, task, hypergrad, vfl)
    for b in (src, tgt, meta):  # padding id 0 (the embedding's padding_idx) in every batch
        b["input_ids"][0, -2:] = 0
    meta["input_ids"][1, :3] = src["input_ids"][1, :3]  # shared rows
    model2 = copy.deepcopy(model)
    inj2 = RTNInjector(model2, list(layers), variant=variant, hidden=2, detach_input=True).double()
    inj2.load_state_dict(inj.state_dict())
    dense = Learner(model2, inj2, sparse.cfg, torch.optim.SGD(model2.parameters(), lr=0.1), _ConstSched(),
                    torch.optim.SGD(inj2.parameters(), lr=0.1), _ConstSched(), contextlib.nullcontext)
    dense.row_sparse_embeddings = False
    rows = sparse.embedding_rows(src, meta)
    assert rows is not None and rows.name == "bert.embeddings.word_embeddings.weight"
    assert rows.src[0] == 0 and len(rows.src) < model.config.vocab_size / 2  # the sparse path is taken
    assert dense.embedding_rows(src, meta) is None

    g_dense, ml_dense = dense.hypergradient(src, 0, tgt, meta)
    g_sparse, ml_sparse = sparse.hypergradient(src, 0, tgt, meta)
    assert ml_sparse == pytest.approx(ml_dense, rel=1e-12)
    assert any(float(g.abs().max()) > 0 for g in g_dense)
    for a, b in zip(g_dense, g_sparse, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6 if hypergrad == "finite-difference" else 1e-9, atol=1e-12)
    s_dense = dense.metaxl_step(src, 0, tgt, meta)
    s_sparse = sparse.metaxl_step(src, 0, tgt, meta)
    assert s_sparse.loss == pytest.approx(s_dense.loss, rel=1e-10)
    for (n, a), b in zip(model2.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=n)


def test_row_sparse_embedding_step_falls_back_where_it_must():
    """Frozen embeddings, a virtual step above them, or weights tied to an output layer: dense."""
    from transformers import BertForMaskedLM

    _, _, learner, src, _, meta = _setup(virtual_from_layer=1)
    assert learner.embedding_rows(src, meta) is None  # embeddings are below the virtual step
    _, _, learner, src, _, meta = _setup()
    learner.model.get_input_embeddings().weight.requires_grad_(False)
    learner.__init__(learner.model, learner.injector, learner.cfg, learner.opt_theta, learner.sched_theta,
                     learner.opt_phi, learner.sched_phi)
    assert learner.embedding_rows(src, meta) is None  # frozen
    tied = BertForMaskedLM(tiny_bert_config()).double()
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    learner = Learner(tied, None, TrainConfig(method="metaxl"), torch.optim.SGD(tied.parameters(), lr=0.1),
                      _ConstSched())
    assert learner.embedding_rows(src, meta) is None


@pytest.mark.parametrize("path", ["split", "gradscaler"])
def test_per_group_inner_lr_hypergradient_matches_finite_differences(path):
    """inner_lr_per_group: theta' = theta - lr_group * g, each parameter at its optimiser group's lr
    (here the head at 4x the encoder's lr), against finite differences of F computed from scratch."""
    model, inj, learner, src, tgt, meta = _setup("plain", (0, 2), "ner")
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    encoder = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    learner.opt_theta = torch.optim.SGD([{"params": encoder, "lr": A}, {"params": head, "lr": 4 * A}])
    learner.cfg = learner.cfg.replace(inner_lr=None, inner_lr_per_group=True)
    lrs = dict(zip(learner.virtual_names, learner.inner_lrs(), strict=True))
    assert lrs["classifier.weight"] == 4 * A and lrs["bert.encoder.layer.0.output.dense.weight"] == A
    if path == "gradscaler":  # the fp16 code path, here in float64
        learner.scaler = torch.amp.GradScaler("cpu")
    exact, _ = learner.hypergradient(src, 0, tgt, meta)
    exact = torch.cat([g.reshape(-1) for g in exact])
    reference = fd_hypergrad(model, inj, learner, src, tgt, meta, lrs=lrs)
    assert (exact - reference).norm() / reference.norm() < 1e-4
    uniform = fd_hypergrad(model, inj, learner, src, tgt, meta)  # one lr for all: a different F
    assert (uniform - reference).norm() / reference.norm() > 1e-2
    learner.cfg = learner.cfg.replace(hypergrad="finite-difference")
    approx = torch.cat([g.reshape(-1) for g in learner.hypergradient(src, 0, tgt, meta)[0]])
    assert torch.nn.functional.cosine_similarity(approx, reference, dim=0) > 0.99


@pytest.mark.parametrize("hypergrad,vfl", [("exact", 0), ("finite-difference", 0), ("exact", 2)])
def test_reuse_source_gradient_steps_theta_on_the_old_phi_gradient(hypergrad, vfl):
    """reuse_source_gradient: phi's step is unchanged, theta's step uses grad L_train(theta, phi_old)
    (computed here from scratch) instead of recomputing the source loss at the new phi."""
    import copy

    model, inj, learner, src, tgt, meta = _setup("plain", (2,), "ner", hypergrad, vfl)
    t, m = split_batch({k: torch.cat([tgt[k], meta[k]]) for k in tgt})
    model_ref = copy.deepcopy(model)
    inj_ref = RTNInjector(model_ref, [2], variant="plain", hidden=2, detach_input=True).double()
    inj_ref.load_state_dict(inj.state_dict())
    loss = learner.train_loss(src, 0, t)
    expected = {n: p.detach() - 0.1 * g for (n, p), g in
                zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters())), strict=True)}
    learner.cfg = learner.cfg.replace(reuse_source_gradient=True)
    calls = []
    train_loss = learner.train_loss
    learner.train_loss = lambda *a, **k: calls.append(a[0] is not None) or train_loss(*a, **k)
    stats = learner.step(src, 0, {k: torch.cat([tgt[k], meta[k]]) for k in tgt})
    assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-10)
    for n, p in model.named_parameters():  # SGD lr 0.1, no clipping at this size
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-9, atol=1e-12, msg=n)

    # the default recomputes the source loss at the new phi: phi moves the same, theta differently
    ref = Learner(model_ref, inj_ref, learner.cfg.replace(reuse_source_gradient=False),
                  torch.optim.SGD(model_ref.parameters(), lr=0.1), _ConstSched(),
                  torch.optim.SGD(inj_ref.parameters(), lr=0.1), _ConstSched(), contextlib.nullcontext)
    ref_calls = []
    ref_loss = ref.train_loss
    ref.train_loss = lambda *a, **k: ref_calls.append(a[0] is not None) or ref_loss(*a, **k)
    ref.step(src, 0, {k: torch.cat([tgt[k], meta[k]]) for k in tgt})
    assert sum(ref_calls) == sum(calls) + 1  # one source forward less
    for a, b in zip(inj.parameters(), inj_ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), model_ref.parameters(), strict=True))
    assert moved > 1e-9, "the two theta steps should differ (phi changed between them)"
