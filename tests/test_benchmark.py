"""benchmarks/step_cost.py: a smoke run (not a timing assertion), and its prototype learner
(the meta.py changes proposed in docs/performance.md) against metaxl.meta.Learner."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_bert_config
from transformers import BertForSequenceClassification, BertForTokenClassification

from metaxl.config import TrainConfig
from metaxl.meta import Learner
from metaxl.rtn import RTNInjector

SCRIPT = REPO / "benchmarks" / "step_cost.py"
METHODS = ["jt", "jt-rtn", "metaxl", "metaxl-fd"]


def _load_script():
    if "step_cost" in sys.modules:
        return sys.modules["step_cost"]
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_cost_smoke(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1",
         "--methods", ",".join(METHODS), "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["methods"]) == set(METHODS)
    for name, row in res["methods"].items():
        assert row["error"] is None, (name, row["error"])
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"]), name
        assert row["median_s"] > 0 and row["peak_mb"] > 0 and row["abs_peak_mb"] > 0, name
    assert res["methods"]["jt"]["time_ratio"] == 1.0
    assert res["methods"]["jt"]["mem_ratio"] == 1.0
    assert {t["method"] for t in res["targets"]} == {"metaxl", "metaxl-fd"}
    assert "s/step" in proc.stdout and "PASS" in proc.stdout or "MISS" in proc.stdout


def test_parse_variant():
    sc = _load_script()
    v = sc.parse_variant("metaxl-fd-frozen-emb-upper6-proto")
    assert (v.base, v.fd, v.frozen_emb, v.upper, v.proto) == ("metaxl", True, True, 6, True)
    assert sc.parse_variant("metaxl-sparse-emb").sparse_emb
    assert sc.parse_variant("jt-rtn-frozen-emb").base == "jt-rtn"
    with pytest.raises(SystemExit):
        sc.parse_variant("jt-fd")


class _ConstSched:
    def step(self) -> None:
        pass


def _pair(variant, layers, task, hypergrad, vfl=0, sparse=False):
    """The same float64 model + RTN twice: one for Learner, one for the prototype."""
    sc = _load_script()
    torch.manual_seed(0)
    cls = BertForTokenClassification if task == "ner" else BertForSequenceClassification
    model = cls(tiny_bert_config(num_labels=3)).double().eval()
    inj = RTNInjector(model, list(layers), variant=variant, hidden=4, detach_input=True).double()
    model2 = copy.deepcopy(model)
    inj2 = RTNInjector(model2, list(layers), variant=variant, hidden=4, detach_input=True).double()
    inj2.load_state_dict(inj.state_dict())
    cfg = TrainConfig(method="metaxl", inner_lr=0.5, hypergrad=hypergrad, virtual_from_layer=vfl, fd_epsilon=1e-3)
    out = []
    for learner_cls, m, i in ((Learner, model, inj), (sc.ProtoLearner, model2, inj2)):
        out.append(learner_cls(m, i, cfg, torch.optim.SGD(m.parameters(), lr=0.1), _ConstSched(),
                               torch.optim.SGD(i.parameters(), lr=0.1), _ConstSched(), contextlib.nullcontext))
    out[1].sparse_emb = sparse
    g = torch.Generator().manual_seed(1)

    def batch(n, length=6):
        ids = torch.randint(4, 40, (n, length), generator=g)  # batches share some ids
        mask = torch.ones(n, length, dtype=torch.long)
        ids[0, -2:], mask[0, -2:] = 0, 0  # padding (pad_token_id 0 = the embedding's padding_idx)
        labels = torch.randint(0, 3, (n, length) if task == "ner" else (n,), generator=g)
        if task == "ner":
            labels[mask == 0] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return out, batch(3), batch(2), batch(2)


@pytest.mark.parametrize("sparse", [False, True], ids=["proto", "sparse-emb"])
@pytest.mark.parametrize("variant,layers,task,hypergrad,vfl", [
    ("plain", (0, 2), "ner", "exact", 0),
    ("gated", (2,), "sa", "exact", 0),
    ("gated", (2,), "ner", "exact", 2),
    ("plain", (0, 2), "ner", "finite-difference", 0),
    ("gated", (2,), "sa", "finite-difference", 0),
])
def test_prototype_matches_learner(variant, layers, task, hypergrad, vfl, sparse):
    (ref, proto), src, tgt, meta = _pair(variant, layers, task, hypergrad, vfl, sparse)
    assert set(src["input_ids"].unique().tolist()) & set(meta["input_ids"].unique().tolist()) - {0}
    g_ref, ml_ref = ref.hypergradient(src, 0, tgt, meta)
    g_new, ml_new = proto.hypergradient(src, 0, tgt, meta)
    assert ml_new == pytest.approx(ml_ref, rel=1e-12)
    for a, b in zip(g_ref, g_new, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6 if hypergrad == "finite-difference" else 1e-9, atol=1e-12)
    # a full step moves theta and phi alike
    s_ref = ref.metaxl_step(src, 0, tgt, meta)
    s_new = proto.metaxl_step(src, 0, tgt, meta)
    assert s_new.loss == pytest.approx(s_ref.loss, rel=1e-10)
    for (n, a), b in zip(ref.model.named_parameters(), proto.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=n)
    for a, b in zip(ref.phi, proto.phi, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
