"""CUDA: every method under bf16/fp16 autocast, with and without activation checkpointing, and the
hypergradient on the GPU against the CPU. Skipped without a CUDA GPU (CI has none); on a GPU
machine run ``python -m pytest tests/test_gpu.py``."""

from __future__ import annotations

import math

import pytest
import torch
from test_meta import _setup, with_dropout
from test_train import _cfg

from metaxl.meta import enable_gradient_checkpointing
from metaxl.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.mark.parametrize("method", ["target-only", "jt", "jt-rtn", "metaxl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_method_trains_on_cuda(toy_data, tiny_model, tmp_path, method, precision, checkpointing):
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", task="ner", method=method, device="cuda",
               precision=precision, gradient_checkpointing=checkpointing)
    res = train(cfg, log=lambda *_: None)
    assert res["status"] == "finished"
    for row in res["epochs"]:
        assert math.isfinite(row["train_loss"])
        if method == "metaxl":
            assert row["meta_loss"] is not None and math.isfinite(row["meta_loss"])


def _on_cuda(hypergrad: str, layers=(1, 2)):
    model, inj, learner, src, tgt, meta = _setup(layers=layers, hypergrad=hypergrad)
    model.float().cuda()
    inj.float().cuda()
    move = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    return model, inj, learner, move(src), move(tgt), move(meta)


def _flat(grads):
    return torch.cat([g.reshape(-1).double().cpu() for g in grads])


@pytest.mark.parametrize("hypergrad", ["exact", "finite-difference"])
def test_cuda_hypergradient_matches_float64_cpu_and_survives_checkpointing(hypergrad):
    model64, inj64, learner64, src, tgt, meta = _setup(layers=(1, 2), hypergrad=hypergrad)
    ref = _flat(learner64.hypergradient(src, 0, tgt, meta)[0])
    model, inj, learner, src, tgt, meta = _on_cuda(hypergrad)
    got = _flat(learner.hypergradient(src, 0, tgt, meta)[0])
    assert float((got - ref).norm() / ref.norm()) < 1e-3
    model.train()  # checkpointing is active in training mode; the tiny config has no dropout
    enable_gradient_checkpointing(model, inj)
    ckpt = _flat(learner.hypergradient(src, 0, tgt, meta)[0])
    assert float((ckpt - got).norm() / got.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_hypergradient_follows_fp32(dtype):
    model, inj, learner, src, tgt, meta = _on_cuda("exact")
    ref = _flat(learner.hypergradient(src, 0, tgt, meta)[0])
    learner.autocast = lambda: torch.autocast("cuda", dtype=dtype)
    got = _flat(learner.hypergradient(src, 0, tgt, meta)[0])
    cos = float(got @ ref / (got.norm() * ref.norm()))
    assert cos > 0.98, cos


def test_cuda_finite_differences_replay_the_dropout_masks():
    """The CUDA generator's state is replayed too: with dropout on, finite differences agree with
    the exact hypergradient on the GPU (float64, so attention runs on the math kernel in both modes
    and draws its masks like every other dropout)."""
    model, inj, learner, src, tgt, meta = _setup("plain", (0, 2), "ner")
    with_dropout(model, 0.2)
    model.cuda().train()
    inj.cuda()
    src, tgt, meta = ({k: v.cuda() for k, v in b.items()} for b in (src, tgt, meta))
    learner.cfg.fd_epsilon = 1e-4
    for seed in range(3):
        out = {}
        for mode in ("exact", "finite-difference"):
            learner.cfg.hypergrad = mode
            torch.manual_seed(seed)
            out[mode] = _flat(learner.hypergradient(src, 0, tgt, meta)[0])
        cos = float(out["exact"] @ out["finite-difference"] / (out["exact"].norm() * out["finite-difference"].norm()))
        assert cos > 0.99, f"seed {seed}: cosine {cos:.4f}"
