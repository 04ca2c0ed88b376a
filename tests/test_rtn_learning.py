"""Issue 29's knobs and diagnostics: identity-initialised RTNs, phi's optimiser, the hypergradient
scale, and the per-epoch evidence of whether the RTN learns."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from conftest import tiny_bert_config
from test_train import _cfg
from transformers import BertForTokenClassification

from metaxl.config import TrainConfig
from metaxl.errors import ConfigError
from metaxl.meta import Learner, split_batch
from metaxl.rtn import RTNInjector
from metaxl.train import train


class _Const:
    def step(self) -> None:
        pass


def _learner(method: str, init: str = "identity", meta_lr: float = 0.0, **cfg_kw):
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config(num_labels=3)).double()
    inj = RTNInjector(model, [2], "gated", 4, init=init).double() if method == "metaxl" else None
    cfg = TrainConfig(method=method, meta_lr=meta_lr, diagnostics_every=0, **cfg_kw)
    opt_t = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(inj.parameters(), lr=meta_lr) if inj is not None else None
    return model, inj, Learner(model, inj, cfg, opt_t, _Const(), opt_p, _Const() if inj else None, contextlib.nullcontext)


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (n, 6), generator=g)}


def test_identity_rtn_with_meta_lr_0_is_jt_on_half_the_target_batch():
    """The control of issue 29 item 4: MetaXL without meta-learning from an identity RTN takes the
    JT step on the source batch and the first half of the target batch, exactly."""
    src, tgt = _batch(4, 1), _batch(6, 2)
    m_meta, _, l_meta = _learner("metaxl")
    m_jt, _, l_jt = _learner("jt")
    l_meta.step(src, 0, tgt)
    l_jt.step(src, 0, split_batch(tgt)[0])
    for (n, a), b in zip(m_meta.named_parameters(), m_jt.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), n
    # the xavier start (official code) is not JT: its RTN distorts the source batch from step one
    m_x, _, l_x = _learner("metaxl", init="xavier")
    l_x.step(src, 0, tgt)
    assert not torch.allclose(m_x.classifier.weight, m_jt.classifier.weight, atol=1e-6)


def test_inverse_lr_scale_divides_the_hypergradient_by_the_inner_lr():
    src, tgt, meta = _batch(4, 1), _batch(3, 2), _batch(3, 3)
    grads = {}
    for scale in ("none", "inverse-lr"):
        model, inj, learner = _learner("metaxl", init="xavier", inner_lr=0.25, hypergrad_scale=scale)
        grads[scale] = learner.hypergradient(src, 0, tgt, meta)[0]
    for a, b in zip(grads["none"], grads["inverse-lr"], strict=True):
        assert torch.allclose(a / 0.25, b, rtol=1e-9, atol=1e-15)
    assert any(float(g.abs().max()) > 0 for g in grads["none"])


def test_unit_scale_steps_phi_by_meta_lr_along_the_hypergradient():
    """hypergrad_scale=unit: phi's SGD step is meta_lr long whatever the hypergradient's size, in
    the direction of inverse-lr's hypergradient; the logged norm is the unscaled one."""
    src, tgt, meta = _batch(4, 1), _batch(3, 2), _batch(3, 3)
    steps, norms = {}, {}
    for scale in ("inverse-lr", "unit"):
        _, inj, learner = _learner("metaxl", init="xavier", meta_lr=0.01, inner_lr=0.25, hypergrad_scale=scale,
                                   meta_batch="separate")
        before = [p.detach().clone() for p in inj.parameters()]
        norms[scale] = learner.step(src, 0, tgt, meta).phi_grad_norm
        steps[scale] = torch.cat([(p.detach() - b).flatten() for p, b in zip(inj.parameters(), before, strict=True)])
    assert float(steps["unit"].norm()) == pytest.approx(0.01, rel=1e-6)  # the norm is taken in float32
    assert float(steps["inverse-lr"].norm()) != pytest.approx(0.01, rel=1e-3)
    assert torch.allclose(steps["unit"], steps["inverse-lr"] / norms["inverse-lr"], rtol=1e-6, atol=1e-12)
    assert norms["unit"] == pytest.approx(norms["inverse-lr"], rel=1e-12)


def test_source_weight_scales_the_source_gradient_of_the_step():
    """JT with source_weight w takes the step of w * L_src + L_tgt (SGD: delta_w = w delta_src + delta_tgt)."""
    src, tgt = _batch(4, 1), _batch(6, 2)
    deltas = {}
    for name, method, w in (("tgt", "target-only", 1.0), ("jt", "jt", 1.0), ("jt2", "jt", 2.5), ("jt0", "jt", 0.0)):
        model, _, learner = _learner(method, source_weight=w)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        learner.step(None if method == "target-only" else src, 0, tgt)
        deltas[name] = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    delta_src = deltas["jt"] - deltas["tgt"]
    assert float(delta_src.abs().max()) > 1e-6
    assert torch.allclose(deltas["jt2"], 2.5 * delta_src + deltas["tgt"], rtol=0, atol=1e-12)
    assert torch.allclose(deltas["jt0"], deltas["tgt"], rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="source_weight"):
        TrainConfig(source_weight=-1.0).validate()


def test_a_norm_preserving_rtn_turns_vectors_but_keeps_their_length():
    from metaxl.rtn import GatedRTN

    torch.manual_seed(0)
    h = torch.randn(2, 5, 16)
    free, kept = GatedRTN(16, 8), GatedRTN(16, 8, preserve_norm=True)
    kept.load_state_dict(free.state_dict())
    assert not torch.allclose(free(h).norm(dim=-1), h.norm(dim=-1), atol=1e-3)
    assert torch.allclose(kept(h).norm(dim=-1), h.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(kept(h), h, atol=1e-3)
    assert torch.equal(GatedRTN(16, 8, init="identity", preserve_norm=True)(h), h) or torch.allclose(
        GatedRTN(16, 8, init="identity", preserve_norm=True)(h), h, atol=1e-6)


def test_bad_knob_values_are_rejected_with_the_choices():
    with pytest.raises(ConfigError, match="identity needs rtn_variant=gated"):
        TrainConfig(rtn_init="identity", rtn_variant="plain").validate()
    with pytest.raises(ConfigError, match="choose one of: adamw, adam-l2"):
        TrainConfig(meta_optimizer="sgd").validate()
    with pytest.raises(ConfigError, match="meta_eps"):
        TrainConfig(meta_eps=0.0).validate()


def test_every_rtn_run_records_whether_the_rtn_learns(toy_data, tiny_model, tmp_path):
    runs = {}
    for name, kw in {"identity": dict(rtn_init="identity", hypergrad_scale="inverse-lr", meta_lr=1e-2),
                     "xavier": dict(rtn_init="xavier", meta_lr=0.0),
                     "identity-off": dict(rtn_init="identity", hypergrad_scale="inverse-lr", meta_lr=1e-2,
                                          diagnostics_every=0)}.items():
        lines: list[str] = []
        kw = {"diagnostics_every": 1, **kw}
        train(_cfg(toy_data, tiny_model, tmp_path / name, method="metaxl", epochs=2, **kw), log=lines.append)
        runs[name] = (json.loads((tmp_path / name / "results.json").read_text()), lines)
    res, lines = runs["identity"]
    assert res["rtn_init"]["rel_change"] == 0.0 and res["rtn_init"]["weight_drift"] == 0.0
    rtn = res["epochs"][-1]["rtn"]
    assert rtn["rel_change"] > 0 and rtn["weight_drift"] > 0  # the meta-gradient moved it
    assert rtn["norm_ratio"] > 0 and -1 <= rtn["cosine"] <= 1 and set(rtn["by_layer"]) == {"2"}
    assert 0 <= rtn["hypergrad_snr"] <= 1 and -1 <= rtn["hypergrad_cosine"] <= 1
    assert rtn["hypergrad_steps"] == 3
    assert rtn["meta_loss_before"] > 0 and rtn["meta_loss_after"] > 0
    assert rtn["meta_step_change"] == pytest.approx(rtn["meta_loss_after"] - rtn["meta_loss_before"], abs=2e-6)
    assert "rtn: change" in lines[0] and "snr" in lines[0] and "meta-step" in lines[0]
    # the official start changes source vectors a lot, and with meta lr 0 it never moves
    xav = runs["xavier"][0]
    assert xav["rtn_init"]["rel_change"] > 0.1
    assert xav["epochs"][-1]["rtn"]["weight_drift"] == 0.0
    assert xav["epochs"][-1]["rtn"]["rel_change"] > 0.1  # (h itself moves with theta)
    # the diagnostics observe, they do not change training (eval mode, no random draw)
    off = runs["identity-off"][0]
    assert "meta_loss_before" not in off["epochs"][-1]["rtn"]
    assert [e["train_loss"] for e in off["epochs"]] == [e["train_loss"] for e in res["epochs"]]
    assert off["test"] == res["test"]


def test_jt_runs_have_no_rtn_diagnostics(toy_data, tiny_model, tmp_path):
    res = train(_cfg(toy_data, tiny_model, tmp_path / "jt", method="jt", epochs=1), log=lambda *_: None)
    assert res["rtn_init"] is None and "rtn" not in res["epochs"][0]
    assert copy.deepcopy(res)["status"] == "finished"
