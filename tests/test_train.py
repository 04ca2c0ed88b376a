"""The training loop end to end on a tiny local model: every method, both tasks, checkpoints."""

from __future__ import annotations

import json
import re

import pytest
import torch

import metaxl
from metaxl.checkpoint import load_checkpoint
from metaxl.cli import main
from metaxl.config import TrainConfig
from metaxl.errors import ConfigError, DataError, MetaXLError
from metaxl.predict import predict_lines
from metaxl.train import train


def _cfg(toy_data, tiny_model, out, task="ner", **kw):
    base = dict(
        target=str(toy_data / f"{task}-tgt"), source=[str(toy_data / f"{task}-src")], model=str(tiny_model),
        epochs=2, batch_size=8, target_size=16, source_size=24, lr=5e-4, meta_lr=1e-3, rtn_hidden=8,
        max_length=32, output_dir=str(out), progress=False, device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["target-only", "jt", "jt-rtn", "metaxl"])
@pytest.mark.parametrize("task", ["ner", "sa"])
def test_every_method_trains_and_writes_results(toy_data, tiny_model, tmp_path, method, task):
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", task=task, method=method)
    res = train(cfg, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["status"] == "finished" and res["status"] == "finished"
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2]
    assert on_disk["best_epoch"] in (1, 2)
    assert on_disk["test"]["f1"] >= 0 and "headline" in on_disk["test"]
    # the code that ran: this checkout's commit (CI and here run from one), or None outside a checkout
    assert on_disk["code"]["metaxl"] == metaxl.__version__
    git = on_disk["code"]["git"]
    norms = [e["phi_grad_norm"] for e in on_disk["epochs"]]
    if method == "metaxl":  # the hypergradient's median norm per epoch (0 only on the first warm-up step)
        assert all(n is not None and n > 0 for n in norms), norms
    else:
        assert norms == [None, None]
    assert git is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", git), git
    steps = on_disk["epochs"][0]["steps"]
    assert steps == (2 if method == "target-only" else 3)  # 16/8 target, 24/8 source
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "metaxl.json").is_file()
    if method in ("jt-rtn", "metaxl"):
        assert (tmp_path / "run" / "rtn.safetensors").is_file()
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), "pt") as fh:
            assert not any("rtn" in k for k in fh.keys()), "the RTN leaked into the saved model"


def test_reloaded_checkpoint_predicts_like_the_trained_model(toy_data, tiny_model, tmp_path):
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", method="metaxl", epochs=1)
    res = train(cfg, log=lambda *_: None)
    loaded = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert loaded.labels == res["labels"]
    import argparse

    from metaxl.cli import cmd_evaluate

    out = tmp_path / "eval.json"
    cmd_evaluate(argparse.Namespace(checkpoint=str(tmp_path / "run" / "checkpoint"), data=cfg.target, split="test",
                                    data_dir=None, sa_labels=None, device="cpu", batch_size=4, json=False,
                                    output=str(out)))
    # the best epoch's test metrics recorded during training equal a fresh evaluation of the reloaded model
    assert json.loads(out.read_text())["f1"] == pytest.approx(res["test"]["f1"], abs=1e-9)
    lines = ["amina went to kisumu", "the unesco and lagos"]
    first = predict_lines(loaded, lines)
    again = predict_lines(load_checkpoint(tmp_path / "run" / "checkpoint"), lines)
    assert first == again
    assert [len(p["tags"]) for p in first] == [4, 4]


def test_rtn_never_changes_evaluation(toy_data, tiny_model, tmp_path):
    """JT+RTN and JT share seeds; the RTN only acts on source batches, so eval uses the plain model."""
    from metaxl.models import load_model
    from metaxl.rtn import RTNInjector

    model = load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER"]).eval()
    x = torch.tensor([[2, 5, 7, 3]])
    before = model(input_ids=x).logits
    inj = RTNInjector(model, [0, 2], "gated", 8)
    after = model(input_ids=x).logits
    torch.testing.assert_close(before, after)
    inj.remove()


def test_multi_source_and_backoff(toy_data, tiny_model, tmp_path):
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", method="metaxl", epochs=1, backoff_epochs=1,
               source=[str(toy_data / "ner-src"), str(toy_data / "ner-src2")], rtn_per_source=True,
               rtn_layers=[0, 2], meta_batch="separate", hypergrad="finite-difference")
    res = train(cfg, log=lambda *_: None)
    assert [e["phase"] for e in res["epochs"]] == ["main", "backoff"]
    assert res["epochs"][0]["steps"] == 3 + 3  # 24/8 from each source
    assert res["sizes"]["source_train"] == [24, 24]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "rtn.safetensors")).keys()
    assert {k.split(".")[1] for k in keys} == {"s0_L0", "s0_L2", "s1_L0", "s1_L2"}


def test_resume_continues_after_interruption(toy_data, tiny_model, tmp_path, monkeypatch):
    import metaxl.train as tr

    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", method="jt", epochs=3)
    calls = {"n": 0}
    real = tr.evaluate

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # dev of epochs 1 and 2 done (state saved after each), die in epoch 3's
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume=True, log=lambda *_: None)
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "running" and len(partial["epochs"]) >= 1
    assert (tmp_path / "run" / "train_state" / "state.pt").is_file()
    monkeypatch.setattr(tr, "evaluate", real)
    logs = []
    res = train(cfg, resume=True, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3]
    assert not (tmp_path / "run" / "train_state").exists()
    # the resumed run is the uninterrupted one: same dev curve, and the test set evaluated on the same
    # best-epoch weights (kept in the saved state when the best epoch came before the interruption)
    whole = train(_cfg(toy_data, tiny_model, tmp_path / "whole", method="jt", epochs=3), log=lambda *_: None)
    assert [e["dev"]["f1"] for e in res["epochs"]] == [e["dev"]["f1"] for e in whole["epochs"]]
    assert res["best_epoch"] == whole["best_epoch"]
    assert res["test"] == whole["test"]


def test_test_set_is_evaluated_once_on_the_best_dev_epochs_weights(toy_data, tiny_model, tmp_path, monkeypatch):
    import metaxl.train as tr

    real = tr.evaluate
    dev_f1 = [50.0, 70.0, 60.0]  # epoch 2 is the best; epoch 3 trains further and is worse
    seen: list[dict[str, torch.Tensor]] = []

    def scripted(model, *a, **k):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        metrics, pred = real(model, *a, **k)
        i = len(seen) - 1
        metrics["f1"] = dev_f1[i] if i < len(dev_f1) else 42.0
        return metrics, pred

    monkeypatch.setattr(tr, "evaluate", scripted)
    res = train(_cfg(toy_data, tiny_model, tmp_path / "run", method="metaxl", epochs=3), log=lambda *_: None)
    assert len(seen) == 4, "expected one dev evaluation per epoch and one test evaluation"
    assert res["best_epoch"] == 2 and res["dev"]["f1"] == 70.0 and res["test"]["f1"] == 42.0
    head = "classifier.weight"
    assert not torch.equal(seen[1][head], seen[2][head])  # epoch 3 changed the weights...
    for name, value in seen[1].items():  # ...and the test set saw epoch 2's
        torch.testing.assert_close(seen[3][name], value, rtol=0, atol=0, msg=name)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint")
    torch.testing.assert_close(dict(saved.model.named_parameters())[head], seen[1][head], rtol=0, atol=0)
    assert json.loads((tmp_path / "run" / "checkpoint" / "metaxl.json").read_text())["epoch"] == 2


def test_prediction_batches_by_length_keep_the_input_order(tiny_model):
    from metaxl.models import load_model
    from metaxl.train import predict_features

    model = load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER"])
    gen = torch.Generator().manual_seed(0)
    feats = []
    for n in (3, 9, 2, 7, 7, 12, 4):
        ids = torch.randint(5, 100, (n,), generator=gen).tolist()
        feats.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [0] * n})
    alone = [predict_features(model, [f], 0, 1, torch.device("cpu"))[0] for f in feats]
    batched = predict_features(model, feats, 0, 3, torch.device("cpu"))
    assert [t.shape[0] for t in batched] == [3, 9, 2, 7, 7, 12, 4]
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_bad_inputs_fail_before_writing(toy_data, tiny_model, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (dict(rtn_layers=[7]), ConfigError, "out of range"),
        (dict(max_length=100), ConfigError, "max-length 64 or less"),
        (dict(target=str(tmp_path / "missing")), DataError, "missing"),
        (dict(model=str(tmp_path / "nomodel")), MetaXLError, "nomodel"),
    ]
    for kw, exc, text in cases:
        cfg = _cfg(toy_data, tiny_model, out, method="metaxl", **kw)
        with pytest.raises(exc, match=text):
            train(cfg, log=lambda *_: None)
        assert not out.exists(), f"{kw} wrote {out} before failing"
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "dev", "test"):
        (bad / f"{split}.txt").write_text("amina B-PER\nkisumu\n\n")
    rc = main(["train", "--target", str(bad), "--source", str(toy_data / "ner-src"), "--model", str(tiny_model),
               "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.txt:2" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_flags_override_yaml(tmp_path):
    from metaxl.cli import build_parser, config_from_args

    y = tmp_path / "c.yaml"
    y.write_text("method: jt\nepochs: 7\nlr: 3e-5\nrtn_layers: 0,12\nsource: [a, b]\n")
    args = build_parser().parse_args(["train", "--config", str(y), "--epochs", "2", "--no-freeze-embeddings"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.epochs, cfg.lr, cfg.rtn_layers, cfg.source) == ("jt", 2, 3e-5, [0, 12], ["a", "b"])
    y.write_text("methd: jt\n")
    with pytest.raises(ConfigError, match="methd"):
        config_from_args(build_parser().parse_args(["train", "--config", str(y)]))


def test_head_lr_puts_the_head_in_its_own_group(tiny_model):
    from metaxl.models import load_model
    from metaxl.train import theta_groups

    model = load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER"])
    head = {id(p) for p in model.classifier.parameters()}
    groups = theta_groups(model, TrainConfig(lr=1e-4, head_lr=3e-3))
    assert [g["lr"] for g in groups] == [1e-4, 3e-3]
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}
    (single,) = theta_groups(model, TrainConfig(lr=1e-4))
    assert len(single["params"]) == len(list(model.parameters()))


def test_no_state_saved_without_save_state_and_data_seed_none_follows_the_seed(toy_data, tiny_model, tmp_path,
                                                                                monkeypatch):
    import metaxl.train as tr

    saved = []
    monkeypatch.setattr(tr, "_save_state", lambda *a, **k: saved.append(1))
    cfg = _cfg(toy_data, tiny_model, tmp_path / "a", method="jt", epochs=2, save_state=False)
    train(cfg, resume=True, log=lambda *_: None)
    assert saved == []
    train(_cfg(toy_data, tiny_model, tmp_path / "b", method="jt", epochs=2), resume=True, log=lambda *_: None)
    assert saved == [1]  # after epoch 1 of 2

    def sample(**kw):
        return [e.tokens for e in tr.prepare_data(_cfg(toy_data, tiny_model, tmp_path / "c", **kw)).target_train]

    assert sample(data_seed=None, seed=1) == sample(data_seed=1, seed=5)
    assert sample(data_seed=None, seed=1) != sample(data_seed=None, seed=2)


def test_group_by_length_batches_similar_lengths_and_keeps_every_example():
    from metaxl.train import GROUP_CHUNK, batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (1237,), generator=g).tolist()
    feats = [{"input_ids": [7] * n, "i": i} for i, n in enumerate(lengths)]

    def padded(bs):
        return sum(max(len(f["input_ids"]) for f in b) * len(b) for b in bs)

    plain = list(batches(feats, 10, torch.Generator().manual_seed(1)))
    grouped = list(batches(feats, 10, torch.Generator().manual_seed(1), group_by_length=True))
    again = list(batches(feats, 10, torch.Generator().manual_seed(1), group_by_length=True))
    assert [[f["i"] for f in b] for b in grouped] == [[f["i"] for f in b] for b in again]  # seeded
    assert sorted(f["i"] for b in grouped for f in b) == list(range(len(feats)))  # each example once
    assert len(grouped) == len(plain) == 124  # chunks of 500 = 50 whole batches: steps per epoch unchanged
    assert padded(grouped) < 1.1 * sum(lengths) < 0.65 * padded(plain)
    assert sorted(len(b) for b in grouped)[:2] == [7, 10]  # one partial batch, as without grouping
    # shuffled: neither the batches nor the examples inside a batch come in length order
    firsts = [max(len(f["input_ids"]) for f in b) for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    inside = [len(f["input_ids"]) for b in grouped for f in b[:2]]
    assert any(a < b for a, b in zip(inside[::2], inside[1::2], strict=True))
    assert any(a > b for a, b in zip(inside[::2], inside[1::2], strict=True))
    assert GROUP_CHUNK == 50
    # the default is untouched: the seeded permutation cut in order
    perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(1)).tolist()
    assert [[f["i"] for f in b] for b in plain] == [perm[i : i + 10] for i in range(0, len(perm), 10)]


@pytest.mark.parametrize("method", ["target-only", "metaxl"])
def test_group_by_length_trains(toy_data, tiny_model, tmp_path, method):
    res = train(_cfg(toy_data, tiny_model, tmp_path / "run", method=method, group_by_length=True), log=lambda *_: None)
    assert res["status"] == "finished" and res["config"]["group_by_length"] is True
    assert res["epochs"][0]["steps"] == (2 if method == "target-only" else 3)
    plain = train(_cfg(toy_data, tiny_model, tmp_path / "plain", method=method), log=lambda *_: None)
    assert res["epochs"][0]["train_loss"] != plain["epochs"][0]["train_loss"]  # other batches were drawn


def test_code_version_names_no_commit_outside_this_checkout(tmp_path, monkeypatch):
    """An installed copy (here: the module file seen from a folder that is no checkout of this
    project) records the version only, never another repository's commit."""
    import subprocess

    import metaxl.train as train_module

    other = tmp_path / "other-repo"
    (other / "pkg" / "metaxl").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "pkg" / "metaxl" / "train.py").write_text("# a copy\n")
    subprocess.run(["git", "-C", str(other), "add", "."], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(train_module, "__file__", str(other / "pkg" / "metaxl" / "train.py"))
    assert train_module.code_version() == {"metaxl": metaxl.__version__, "git": None}


def test_the_training_loop_takes_the_thread_count_a_sweep_writes(toy_data, tiny_model, tmp_path, monkeypatch):
    """A sweep raises a run's threads through $METAXL_THREADS_FILE (metaxl.threads); the loop
    calls torch.set_num_threads with it and says so in its log."""
    from metaxl.threads import THREADS_FILE_ENV, write_threads

    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    path = tmp_path / "threads"
    write_threads(path, wanted)
    monkeypatch.setenv(THREADS_FILE_ENV, str(path))
    lines: list[str] = []
    try:
        res = train(_cfg(toy_data, tiny_model, tmp_path / "run", method="jt", epochs=1), log=lines.append)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
    assert res["status"] == "finished"
    said = [line for line in lines if line.startswith("threads:")]
    assert said == [f"threads: {before} -> {wanted} (set by the sweep through ${THREADS_FILE_ENV})"]


def test_a_seed_gives_the_same_run_in_fresh_processes(toy_data, tiny_model, tmp_path):
    """What the study's committed runs rest on: the same config and seed, trained in two new
    processes (different string-hash seeds, so nothing may hang on set or dict-of-hash order), give
    the same losses, hypergradient norms and scores, to the last bit on one CPU thread."""
    import os
    import subprocess
    import sys

    from metaxl.threads import THREADS_FILE_ENV

    def run(out, hash_seed):
        env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "1"}
        env.pop(THREADS_FILE_ENV, None)  # a sweep's thread changes would not be the run's
        subprocess.run([sys.executable, "-m", "metaxl", "train", "--method", "metaxl", "--target", str(toy_data / "ner-tgt"),
                        "--source", str(toy_data / "ner-src"), "--model", str(tiny_model), "--epochs", "2",
                        "--batch-size", "8", "--target-size", "16", "--source-size", "24", "--lr", "5e-4",
                        "--meta-lr", "1e-3", "--rtn-hidden", "8", "--max-length", "32", "--seed", "3",
                        "--no-progress", "--no-save-checkpoint", "--device", "cpu", "--output-dir", str(out)],
                       check=True, env=env, capture_output=True)
        res = json.loads((out / "results.json").read_text())
        return [(e["train_loss"], e["meta_loss"], e["phi_grad_norm"], e["dev"]) for e in res["epochs"]], res["test"]

    first, second = run(tmp_path / "a", 1), run(tmp_path / "b", 2)
    assert first == second
    assert first[0][0][2] > 0  # a MetaXL run: the hypergradient was taken


def test_state_save_leaves_out_frozen_parameters_and_resumes_exactly(toy_data, tiny_model, tmp_path, monkeypatch):
    """The per-epoch state holds no frozen parameter (the study freezes e5-small's 96M-parameter word
    embeddings: 0.38 GB a save); resuming from it is the uninterrupted run."""
    import metaxl.train as tr

    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", method="jt", epochs=2, freeze_embeddings=True)
    real = tr.evaluate
    calls = {"n": 0}

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1's dev done and its state saved; die in epoch 2's
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume=True, log=lambda *_: None)
    state = torch.load(tmp_path / "run" / "train_state" / "state.pt", weights_only=False)
    assert not any("word_embeddings" in k for k in state["model"])
    assert any("classifier" in k for k in state["model"])
    monkeypatch.setattr(tr, "evaluate", real)
    res = train(cfg, resume=True, log=lambda *_: None)
    whole = train(cfg.replace(output_dir=str(tmp_path / "whole")), log=lambda *_: None)
    assert [e["dev"]["f1"] for e in res["epochs"]] == [e["dev"]["f1"] for e in whole["epochs"]]
    assert res["test"] == whole["test"]
