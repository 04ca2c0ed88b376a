"""The Python API: ``from metaxl import TrainConfig, train, evaluate, predict`` on a tiny local model."""

from __future__ import annotations

import importlib

import pytest
import torch

from metaxl import TrainConfig, TrainResult, evaluate, predict, train
from metaxl.checkpoint import load_checkpoint
from metaxl.data import NERExample, SAExample, resolve_dataset
from metaxl.errors import ConfigError, DataError, ModelError

FAST = dict(epochs=2, batch_size=8, target_size=16, source_size=24, lr=5e-4, meta_lr=1e-3, rtn_hidden=8,
            max_length=32, progress=False, device="cpu")


def test_the_public_names_import_and_the_training_module_stays_reachable():
    import inspect

    import metaxl
    import metaxl.api
    import metaxl.predict as predict_module
    import metaxl.train as loop  # the module (it used to bind the API function, issue 31)

    assert metaxl.train is train is loop is importlib.import_module("metaxl.train")
    assert callable(loop.batches) and callable(loop.train) and loop.train is not metaxl.api.train
    assert predict_module is predict and callable(predict_module.predict_lines)
    # called, each module is the API's function of its name, with that function's signature
    assert inspect.signature(train) == inspect.signature(metaxl.api.train)
    assert inspect.signature(predict) == inspect.signature(metaxl.api.predict)


def test_calling_the_train_module_calls_the_api(monkeypatch):
    import metaxl
    import metaxl.api

    seen = []
    monkeypatch.setattr(metaxl.api, "train", lambda *a, **k: seen.append((a, k)) or "api")
    assert metaxl.train("cfg", resume=True) == "api" and seen == [(("cfg",), {"resume": True})]


def test_a_single_source_string_is_one_source_not_one_per_letter():
    assert TrainConfig(source="data/sa-src").source == ["data/sa-src"]
    assert TrainConfig(rtn_layers=12).rtn_layers == [12]  # type: ignore[arg-type]
    assert TrainConfig(source=None).source == []  # type: ignore[arg-type]


def test_train_by_names_returns_the_model_and_writes_nothing_without_output_dir(toy_data, tiny_model, tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = train(TrainConfig(target=str(toy_data / "ner-tgt"), source=str(toy_data / "ner-src"),
                            model=str(tiny_model), output_dir=None, **FAST), log=lambda *_: None)
    assert isinstance(res, TrainResult) and res.output_dir is None and res.checkpoint is None
    assert list(tmp_path.iterdir()) == [], "output_dir=None wrote files"
    assert res.task == "ner" and res.results["status"] == "finished" and res.best_epoch in (1, 2)
    assert res.test is not None and res.metrics["test"] is res.test
    assert res.rtn is not None and not any("rtn" in n for n, _ in res.model.named_parameters())
    # the returned model is the best dev epoch's: evaluating it again gives the run's test metrics
    again = evaluate(res, str(toy_data / "ner-tgt"), split="test")
    assert again["f1"] == pytest.approx(res.test["f1"])
    one = predict(res, "amina went to kisumu")
    assert one["tokens"] == ["amina", "went", "to", "kisumu"] and len(one["tags"]) == 4
    many = res.predict(["amina went to kisumu", ["otieno", "in", "lagos"]])
    assert [len(m["tags"]) for m in many] == [4, 3]
    # save() writes a checkpoint that load_checkpoint and the functions read back
    folder = res.save(tmp_path / "saved")
    loaded = load_checkpoint(folder)
    assert loaded.labels == res.labels
    assert predict(str(folder), "amina went to kisumu")["tags"] == one["tags"]
    assert evaluate(str(folder), str(toy_data / "ner-tgt"))["f1"] == pytest.approx(res.test["f1"])


def test_examples_and_a_model_object_can_be_passed(toy_data, tiny_model, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    sa = resolve_dataset(str(toy_data / "sa-tgt"), task="sa")
    src = resolve_dataset(str(toy_data / "sa-src"), task="sa").load("train")
    base = AutoModel.from_pretrained(tiny_model)  # no task head: train() adds one
    tok = AutoTokenizer.from_pretrained(tiny_model)
    res = train(model=base, tokenizer=tok, target=sa.load("train"), source=src, dev=sa.load("dev"),
                test=sa.load("test"), method="jt", output_dir=str(tmp_path / "run"), log=lambda *_: None, **FAST)
    assert res.task == "sa" and type(res.model).__name__.endswith("ForSequenceClassification")
    assert res.results["target"] == "in-memory" and res.results["source"] == ["in-memory:0"]
    assert res.results["sizes"]["target_train"] == 16 and res.results["sizes"]["source_train"] == [24]
    assert res.checkpoint is not None and (res.checkpoint / "model.safetensors").is_file()
    # the checkpoint explains itself: a model card with method, languages, sizes, metrics and config
    card = (res.checkpoint / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "| method | jt |" in card
    assert "| target language | in-memory: 16 training examples, dev 12, test 12 |" in card
    assert "| source language(s) | in-memory:0: 24 training examples |" in card
    assert f"| test f1 | {res.test['f1']:.2f}" in card and f"| best dev epoch | {res.best_epoch} of 2 |" in card
    assert "```yaml\ntarget: in-memory\n" in card and "extend_vocab: 0" in card
    out = predict(res, ["good food, love it", "bad and sad"])
    assert {o["label"] for o in out} <= {"positive", "negative"}
    assert evaluate(res, sa.load("test"))["f1"] == pytest.approx(res.test["f1"])
    # a model that already has the right head is trained in place
    head = res.model
    before = head.classifier.weight.detach().clone()
    res2 = train(model=head, tokenizer=tok, target=sa.load("train"), dev=sa.load("dev"), test=sa.load("test"),
                 method="target-only", output_dir=None, log=lambda *_: None, **FAST)
    assert res2.model is head and not torch.equal(before, head.classifier.weight)


def test_api_errors_are_clear(toy_data, tiny_model):
    exs = [NERExample(("a", "b"), ("O", "B-PER"))] * 4
    with pytest.raises(DataError, match="dev=\\[examples\\]"):
        train(target=exs, model=str(tiny_model), output_dir=None)
    with pytest.raises(DataError, match="NERExample or of SAExample"):
        train(target=[("a", "O")], dev=exs, test=exs, model=str(tiny_model), output_dir=None)
    with pytest.raises(DataError, match="test examples are sa"):
        train(target=exs, dev=exs, test=[SAExample("x", "positive")], output_dir=None)
    with pytest.raises(ConfigError, match="with a named target"):
        train(target=str(toy_data / "ner-tgt"), dev=exs, output_dir=None)
    with pytest.raises(ConfigError, match="unknown key"):
        train(epochz=3)
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        train(model=torch.nn.Linear(2, 2), target=exs, dev=exs, test=exs, output_dir=None)
    with pytest.raises(ModelError, match="TrainResult"):
        predict(42, "x")
    with pytest.raises(ConfigError, match="resume needs an output_dir"):
        train(TrainConfig(target=str(toy_data / "ner-tgt"), source=str(toy_data / "ner-src"),
                          model=str(tiny_model), output_dir=None, **FAST), resume=True)
