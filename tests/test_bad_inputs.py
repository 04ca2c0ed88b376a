"""A corpus of bad inputs and invocations, run against the CLI as a new user would type them.

Every case asserts, through one helper (:func:`run_case`): the exit code; one ``metaxl: error:``
line naming the file (and line where there is one) and saying what to do; no traceback; and that
nothing half-written is left (the output folder absent, unchanged, or holding valid JSON with the
run marked failed; no ``*.tmp``/``*.old`` anywhere).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from metaxl.cli import main

TRAIN = dict(epochs="1", batch_size="8", target_size="16", source_size="8", max_length="32", rtn_hidden="8",
             device="cpu", method="jt")


@dataclass
class Ctx:
    """Paths a case builds its bad input from (all under the test's tmp folder)."""

    tmp: Path
    data: Path
    model: Path
    ner_ckpt: Path
    sa_ckpt: Path
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.tmp / "out"

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst)
        return dst

    def ner(self, name: str = "tgt", train: str | bytes | None = None, **files: str | bytes | None) -> Path:
        """A copy of the toy NER target whose train.txt (and other files) are replaced."""
        folder = self.copy(self.data / "ner-tgt", name)
        for fname, content in {"train.txt": train, **{k.replace("_", "."): v for k, v in files.items()}}.items():
            if content is None:
                continue
            path = folder / fname
            if content == "<delete>":
                path.unlink()
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        return folder

    def sa(self, name: str = "sa", train: str | None = None, ext: str = "csv") -> Path:
        folder = self.copy(self.data / "sa-tgt", name)
        if train is not None:
            (folder / "train.csv").unlink()
            (folder / f"train.{ext}").write_text(train)
        return folder

    def train(self, **kw: str | None) -> list[str]:
        """``metaxl train`` on the toy NER data and tiny model, with ``kw`` overriding flags."""
        opts: dict[str, str | None] = dict(target=str(self.data / "ner-tgt"), source=str(self.data / "ner-src"),
                                           model=str(self.model), output_dir=str(self.out), **TRAIN)
        opts.update(kw)
        argv = ["train", "--no-progress"]
        for key, value in opts.items():
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", value]
        return argv

    def yaml(self, content: str | bytes) -> str:
        path = self.tmp / "c.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)


@dataclass
class Case:
    name: str
    argv: Callable[[Ctx], list[str]]
    needs: tuple[str, ...]
    rc: int = 2
    out: str = "absent"  # absent | unchanged | failed
    stdin: bytes | None = None
    before: Callable[[Ctx], None] | None = None
    where: Callable[[Ctx], str] | None = None  # the file the error must name (default: none)


GOOD_SA = "text,label\n" + "".join(f"good happy {i},positive\nbad sad {i},negative\n" for i in range(6))


def _finished_run(ctx: Ctx, **kw: str) -> None:
    assert main(ctx.train(**kw)) == 0


def _running_run(ctx: Ctx, **kw: str) -> None:
    """A run interrupted after its first epoch (results.json 'running', train_state/ saved)."""
    _finished_run(ctx, epochs="2", **kw)
    res = json.loads((ctx.out / "results.json").read_text())
    res["status"] = "running"
    (ctx.out / "results.json").write_text(json.dumps(res))


def _corrupt_state(ctx: Ctx) -> None:
    _running_run(ctx)
    (ctx.out / "train_state").mkdir(exist_ok=True)
    (ctx.out / "train_state" / "state.pt").write_bytes(b"not a torch file")


def _model_variant(ctx: Ctx, drop: tuple[str, ...] = (), write: dict[str, bytes] | None = None) -> str:
    folder = ctx.copy(ctx.model, "model-variant")
    for name in drop:
        (folder / name).unlink()
    for name, content in (write or {}).items():
        (folder / name).write_bytes(content)
    return str(folder)


def _ckpt_variant(ctx: Ctx, drop: tuple[str, ...] = (), write: dict[str, bytes] | None = None) -> str:
    folder = ctx.copy(ctx.ner_ckpt, "ckpt-variant")
    for name in drop:
        (folder / name).unlink()
    for name, content in (write or {}).items():
        (folder / name).write_bytes(content)
    return str(folder)


def _sweep(ctx: Ctx, text: str | bytes) -> list[str]:
    path = ctx.tmp / "sweep.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["sweep", str(path), "--runs-dir", str(ctx.out), "--dry-run", "--no-progress"]


def _analyze(ctx: Ctx, *ckpts: str, **kw: str) -> list[str]:
    opts = dict(source=str(ctx.data / "ner-src"), target=str(ctx.data / "ner-tgt"), out=str(ctx.out),
                device="cpu", n="8")
    opts.update(kw)
    return ["analyze", *ckpts, *[x for k, v in opts.items() for x in (f"--{k}", v)], "--no-progress"]


def _train_file(ctx: Ctx, name: str = "tgt") -> str:
    return str(ctx.tmp / name / "train.txt")


CASES = [
    # ------------------------------------------------------------------ train: data
    Case("target-missing", lambda c: c.train(target=str(c.tmp / "nope")), ("nope",)),
    Case("conll-one-column", lambda c: c.train(target=str(c.ner(train="amina B-PER\nkisumu\n\n"))), ("train.txt:2",)),
    Case("conll-bad-tag", lambda c: c.train(target=str(c.ner(train="amina X-PER\n\n"))), ("train.txt:1", "X-PER")),
    Case("conll-bad-tag-prefix", lambda c: c.train(target=str(c.ner(train="amina O\nkisumu LOC-B\n\n"))),
         ("train.txt:2",)),
    Case("conll-empty-train", lambda c: c.train(target=str(c.ner(train=""))), ("train.txt",)),
    Case("conll-blank-lines-only", lambda c: c.train(target=str(c.ner(train="\n\n\n"))), ("train.txt",)),
    Case("conll-no-train-file", lambda c: c.train(target=str(c.ner(train="<delete>"))), ("train",)),
    Case("conll-not-utf8", lambda c: c.train(target=str(c.ner(train=b"amina B-PER\nkis\xffumu O\n\n"))),
         ("train.txt:2",)),
    Case("conll-dev-not-utf8", lambda c: c.train(target=str(c.ner(dev_txt=b"amina B-PER\n\xfe O\n\n"))),
         ("dev.txt:2",)),
    Case("conll-dev-unknown-type", lambda c: c.train(target=str(c.ner(dev_txt="amina B-XYZ\n\n"))), ("B-XYZ",)),
    Case("sa-missing-label-column", lambda c: c.train(method="jt", target=str(c.sa(train="text,foo\nok,5\n")),
                                                      source=str(c.data / "sa-src")), ("train.csv",)),
    Case("sa-whitespace-text", lambda c: c.train(target=str(c.sa(train=GOOD_SA + "   ,positive\n")),
                                                 source=str(c.data / "sa-src")), ("train.csv:14", "text")),
    Case("sa-label-typo", lambda c: c.train(target=str(c.sa(train=GOOD_SA + "good love,positve\n")),
                                            source=str(c.data / "sa-src")), ("train.csv:14", "positve", "positive")),
    Case("sa-missing-label-value", lambda c: c.train(target=str(c.sa(train=GOOD_SA + "good love,\n")),
                                                     source=str(c.data / "sa-src")), ("train.csv:14", "label")),
    Case("sa-jsonl-malformed", lambda c: c.train(target=str(c.sa(train='{"text": "good", "label": "positive"}\n{oops\n',
                                                                 ext="jsonl")),
                                                 source=str(c.data / "sa-src")), ("train.jsonl:2",)),
    Case("sa-csv-bad-quoting", lambda c: c.train(target=str(c.sa(train='text,label\n"good,positive\nbad,negative\n')),
                                                 source=str(c.data / "sa-src")), ("train.csv",)),
    Case("source-task-mismatch", lambda c: c.train(source=str(c.data / "sa-src")), ("sa-src",)),
    Case("sa-label-sets-differ", lambda c: c.train(target=str(c.sa(train=GOOD_SA + "meh,mixed\n" * 5)),
                                                   source=str(c.data / "sa-src")), ("labels differ",)),
    Case("unknown-corpus", lambda c: c.train(target="nocorpus:luo"), ("nocorpus",)),
    Case("unknown-language", lambda c: c.train(target="masakhaner2:xx"), ("masakhaner2:xx",)),
    Case("empty-target-name", lambda c: c.train(target=" "), ("empty data set name",)),
    # ------------------------------------------------------------------ train: config
    Case("max-grad-norm-negative", lambda c: c.train(max_grad_norm="-1"), ("max_grad_norm must be > 0",)),
    Case("max-grad-norm-zero", lambda c: c.train(max_grad_norm="0"), ("max_grad_norm must be > 0",)),
    Case("lr-nan", lambda c: c.train(lr="nan"), ("lr must be a finite number",)),
    Case("lr-negative-exponent", lambda c: c.train(lr="-1e-4"), ("lr must be > 0",)),
    Case("weight-decay-negative", lambda c: c.train(weight_decay="-0.1"), ("weight_decay must be >= 0",)),
    Case("meta-lr-inf", lambda c: c.train(method="metaxl", meta_lr="inf"), ("meta_lr must be a finite number",)),
    Case("head-lr-nan", lambda c: c.train(head_lr="nan"), ("head_lr",)),
    Case("epochs-zero", lambda c: c.train(epochs="0"), ("epochs must be >= 1",)),
    Case("batch-size-negative", lambda c: c.train(batch_size="-1"), ("batch_size must be >= 1",)),
    Case("warmup-one", lambda c: c.train(warmup="1.5"), ("warmup",)),
    Case("method-unknown", lambda c: c.train(method="maml"), ("'maml'", "choose from", "metaxl")),
    Case("on-nonfinite-unknown", lambda c: c.train(on_nonfinite="ignore"), ("on-nonfinite", "choose from")),
    Case("rtn-layer-out-of-range", lambda c: c.train(method="metaxl", rtn_layers="7"), ("out of range",)),
    Case("max-length-too-long", lambda c: c.train(max_length="100"), ("max-length 64 or less",)),
    Case("device-cuda-absent", lambda c: c.train(device="cuda:7"), ("cuda",)),
    Case("fp16-on-cpu", lambda c: c.train(precision="fp16"), ("fp16",)),
    Case("config-missing", lambda c: c.train(config=str(c.tmp / "none.yaml")), ("none.yaml",)),
    Case("config-rtn-layers-letters", lambda c: c.train(config=c.yaml('rtn_layers: "a"\n')), ("c.yaml", "rtn_layers")),
    Case("config-not-utf8", lambda c: c.train(config=c.yaml(b"lr: 1e-3\nmethod: jt\xff\n")), ("c.yaml", "UTF-8")),
    Case("config-bad-yaml", lambda c: c.train(config=c.yaml("lr: [1, \n")), ("c.yaml", "YAML")),
    Case("config-not-mapping", lambda c: c.train(config=c.yaml("- lr\n- 3\n")), ("c.yaml", "mapping")),
    Case("config-unknown-key", lambda c: c.train(config=c.yaml("learning_rate: 3\n")), ("c.yaml", "learning_rate")),
    Case("config-lr-string", lambda c: c.train(config=c.yaml("lr: fast\n")), ("c.yaml", "lr")),
    Case("config-is-folder", lambda c: c.train(config=str(c.tmp)), ("config",)),
    # ------------------------------------------------------------------ train: model folders
    Case("model-missing", lambda c: c.train(model=str(c.tmp / "no-model")), ("no-model",)),
    Case("model-no-config", lambda c: c.train(model=_model_variant(c, drop=("config.json",))), ("config.json",)),
    Case("model-no-tokenizer", lambda c: c.train(model=_model_variant(c, drop=("tokenizer.json", "tokenizer_config.json"))),
         ("model-variant", "tokenizer")),
    Case("model-corrupt-config", lambda c: c.train(model=_model_variant(c, write={"config.json": b"{not json"})),
         ("model-variant",)),
    Case("model-corrupt-weights", lambda c: c.train(model=_model_variant(c, write={"model.safetensors": b"garbage"})),
         ("model-variant",)),
    # ------------------------------------------------------------------ train: output folders, resume, divergence
    Case("output-is-file", lambda c: c.train(output_dir=str(c.tmp / "f")), ("is a file",),
         before=lambda c: (c.tmp / "f").write_text("x"), out="unchanged"),
    Case("output-parent-is-file", lambda c: c.train(output_dir=str(c.tmp / "f" / "run")), ("is a file",),
         before=lambda c: (c.tmp / "f").write_text("x")),
    Case("resume-other-method", lambda c: c.train(method="metaxl", epochs="2") + ["--resume"],
         ("method: jt -> metaxl", "--resume"), before=_running_run, out="unchanged"),
    Case("resume-other-rtn-hidden", lambda c: c.train(method="jt-rtn", rtn_hidden="16", epochs="2") + ["--resume"],
         ("rtn_hidden: 8 -> 16",), before=lambda c: _running_run(c, method="jt-rtn"), out="unchanged"),
    Case("resume-other-lr", lambda c: c.train(lr="0.1", epochs="2") + ["--resume"], ("lr: 3e-05 -> 0.1",),
         before=_running_run, out="unchanged"),
    Case("resume-finished", lambda c: c.train() + ["--resume"], (), rc=0, before=_finished_run, out="unchanged"),
    Case("resume-corrupt-state", lambda c: c.train(epochs="2") + ["--resume"], ("state.pt", "delete"),
         before=_corrupt_state, out="unchanged"),
    Case("diverges-lr-1e30", lambda c: c.train(lr="1e30"), ("diverged at epoch 1, step 1", "--lr"), out="failed"),
    # ------------------------------------------------------------------ evaluate
    Case("eval-ckpt-missing", lambda c: ["evaluate", str(c.tmp / "nock"), str(c.data / "ner-tgt")], ("nock",)),
    Case("eval-run-folder", lambda c: ["evaluate", str(c.ner_ckpt.parent), str(c.data / "ner-tgt"), "--device", "cpu"],
         ("did you mean",)),
    Case("eval-meta-corrupt", lambda c: ["evaluate", _ckpt_variant(c, write={"metaxl.json": b"{"}),
                                         str(c.data / "ner-tgt"), "--device", "cpu"], ("metaxl.json",)),
    Case("eval-meta-no-labels", lambda c: ["evaluate", _ckpt_variant(c, write={"metaxl.json": b'{"task": "ner"}'}),
                                           str(c.data / "ner-tgt"), "--device", "cpu"], ("metaxl.json",)),
    Case("eval-meta-not-utf8", lambda c: ["evaluate", _ckpt_variant(c, write={"metaxl.json": b"\xff\xfe"}),
                                          str(c.data / "ner-tgt"), "--device", "cpu"], ("metaxl.json",)),
    Case("eval-weights-missing", lambda c: ["evaluate", _ckpt_variant(c, drop=("model.safetensors",)),
                                            str(c.data / "ner-tgt"), "--device", "cpu"], ("ckpt-variant",)),
    Case("eval-no-tokenizer", lambda c: ["evaluate", _ckpt_variant(c, drop=("tokenizer.json", "tokenizer_config.json")),
                                         str(c.data / "ner-tgt"), "--device", "cpu"], ("ckpt-variant", "tokenizer")),
    Case("eval-task-mismatch", lambda c: ["evaluate", str(c.ner_ckpt), str(c.data / "sa-tgt"), "--device", "cpu"],
         ("sa-tgt",)),
    Case("eval-unknown-label", lambda c: ["evaluate", str(c.ner_ckpt), str(c.ner(test_txt="amina B-XYZ\n\n")),
                                          "--device", "cpu"], ("B-XYZ",)),
    Case("eval-split-missing", lambda c: ["evaluate", str(c.ner_ckpt), str(c.ner(test_txt="<delete>")),
                                          "--device", "cpu"], ("test",)),
    Case("eval-output-folder", lambda c: ["evaluate", str(c.ner_ckpt), str(c.data / "ner-tgt"), "--device", "cpu",
                                          "--output", str(c.tmp)], ("--output", "folder")),
    Case("eval-output-parent-missing", lambda c: ["evaluate", str(c.ner_ckpt), str(c.data / "ner-tgt"), "--device",
                                                  "cpu", "--output", str(c.tmp / "no" / "m.json")], ("m.json",)),
    Case("eval-data-not-utf8", lambda c: ["evaluate", str(c.ner_ckpt), str(c.ner(test_txt=b"\xff B-PER\n\n")),
                                          "--device", "cpu"], ("test.txt:1",)),
    # ------------------------------------------------------------------ predict
    Case("predict-file-not-utf8", lambda c: ["predict", str(c.ner_ckpt), "--device", "cpu", "--input",
                                             str(c.tmp / "in.txt")], ("in.txt:2", "UTF-8"),
         before=lambda c: (c.tmp / "in.txt").write_bytes(b"amina went\nkis\xe9umu\n")),
    Case("predict-stdin-not-utf8", lambda c: ["predict", str(c.ner_ckpt), "--device", "cpu"],
         ("standard input:1", "UTF-8"), stdin=b"amina \xff kisumu\n"),
    Case("predict-input-missing", lambda c: ["predict", str(c.ner_ckpt), "--device", "cpu", "--input",
                                             str(c.tmp / "none.txt")], ("none.txt",)),
    Case("predict-input-folder", lambda c: ["predict", str(c.ner_ckpt), "--device", "cpu", "--input", str(c.tmp)],
         ("folder",)),
    Case("predict-empty-stdin", lambda c: ["predict", str(c.ner_ckpt), "--device", "cpu"], ("no input text",),
         stdin=b"\n  \n"),
    Case("predict-ckpt-missing", lambda c: ["predict", str(c.tmp / "nock"), "--device", "cpu"], ("nock",),
         stdin=b"amina\n"),
    # ------------------------------------------------------------------ sweep / report / analyze
    Case("sweep-missing", lambda c: ["sweep", str(c.tmp / "none.yaml"), "--dry-run"], ("none.yaml",)),
    Case("sweep-bad-yaml", lambda c: _sweep(c, "grid: [1,\n"), ("sweep.yaml", "YAML")),
    Case("sweep-not-utf8", lambda c: _sweep(c, b"base:\n  lr: 1\xff\n"), ("sweep.yaml", "UTF-8")),
    Case("sweep-grid-not-mapping", lambda c: _sweep(c, "grid: [1, 2]\n"), ("sweep.yaml", "grid")),
    Case("sweep-bad-value", lambda c: _sweep(c, "base:\n  epochs: many\n"), ("sweep.yaml", "epochs")),
    Case("sweep-jobs-zero", lambda c: _sweep(c, "base:\n  epochs: 1\n") + ["--jobs", "0"], ("--jobs",)),
    Case("report-missing", lambda c: ["report", str(c.tmp / "noruns"), "--no-plots"], ("noruns",)),
    Case("report-empty", lambda c: ["report", str(c.tmp / "empty"), "--no-plots"], ("empty",),
         before=lambda c: (c.tmp / "empty").mkdir(), out="absent"),
    Case("analyze-ckpt-missing", lambda c: _analyze(c, str(c.tmp / "nock")), ("nock",)),
    Case("analyze-bad-layer", lambda c: _analyze(c, str(c.ner_ckpt), layer="9"), ("layer",)),
    Case("analyze-data-missing", lambda c: _analyze(c, str(c.ner_ckpt), target=str(c.tmp / "nodata")), ("nodata",)),
    Case("analyze-bad-split", lambda c: _analyze(c, str(c.ner_ckpt), split="validation2"), ("validation2",)),
]


# ---------------------------------------------------------------------------- the helper
def _snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _strict_json(path: Path) -> Any:
    def no_constant(name: str) -> None:
        raise AssertionError(f"{path}: bare {name} in JSON")

    return json.loads(path.read_text(), parse_constant=no_constant)


DO = re.compile(r"\b(use|give|check|choose|pass|fix|set|save|delete|remove|free|run|lower|raise|relabel|rename|"
                r"copy|write|re-train|restore|did you mean|put|add|quote|expected|needs|valid keys)\b", re.IGNORECASE)


def run_cli(argv: list[str], capsys: Any, monkeypatch: Any, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run ``metaxl argv`` in this process; a traceback fails the test (main lets only bugs escape)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse's verdict on the command line (Parser.error: one line, exit 2)
        rc = stop.code if isinstance(stop.code, int) else 2
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_case(case: Case, ctx: Ctx, capsys: Any, monkeypatch: Any) -> str:
    if case.before is not None:
        case.before(ctx)
        capsys.readouterr()
    argv = case.argv(ctx)
    watched = Path(argv[argv.index("--output-dir") + 1]) if "--output-dir" in argv else ctx.out
    before = _snapshot(watched)
    rc, out, err = run_cli(argv, capsys, monkeypatch, case.stdin)
    assert "Traceback" not in err + out
    assert rc == case.rc, f"exit code {rc}, expected {case.rc}; stderr: {err[-500:]}"
    errors = [line for line in err.splitlines() if line.startswith("metaxl: error:")]
    if case.rc == 0:
        assert not errors, errors
        message = out + err
    else:
        assert len(errors) == 1 and "metaxl: error:" not in err.replace(errors[0], ""), err
        message = errors[0]
        # says what to do: an instruction after the diagnosis
        assert DO.search(message.split(": ", 2)[-1]), f"no instruction in: {message}"
    for needed in case.needs:
        assert needed in message, f"{needed!r} not in: {message}"
    # nothing half-written
    leftovers = [p for p in ctx.tmp.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers
    if case.out == "absent":
        assert not watched.exists() or watched.is_file() or not any(watched.iterdir()), sorted(watched.rglob("*"))
    elif case.out == "unchanged":
        assert _snapshot(watched) == before
    else:  # failed: valid JSON saying so, with the reason
        results = _strict_json(watched / "results.json")
        assert results["status"] == "failed" and results["error"] in message
    return message


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: Any, toy_data: Path, tiny_model: Path) -> tuple[Path, Path]:
    from metaxl.config import TrainConfig
    from metaxl.train import train

    root = tmp_path_factory.mktemp("ckpts")
    out = []
    for task in ("ner", "sa"):
        cfg = TrainConfig(target=str(toy_data / f"{task}-tgt"), source=[str(toy_data / f"{task}-src")],
                          model=str(tiny_model), method="jt", epochs=1, batch_size=8, target_size=16,
                          source_size=8, max_length=32, output_dir=str(root / task), progress=False, device="cpu")
        train(cfg, log=lambda *_: None)
        out.append(root / task / "checkpoint")
    return out[0], out[1]


def test_the_corpus_is_large_and_covers_every_command() -> None:
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    prefixes = {c.name.split("-")[0] for c in CASES}
    assert {"eval", "predict", "sweep", "report", "analyze", "conll", "sa", "config", "model", "resume"} <= prefixes


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, toy_data: Path, tiny_model: Path, checkpoints: tuple[Path, Path],
                   capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METAXL_DATA", str(tmp_path / "no-shared-data"))  # name lookups never find real data
    ctx = Ctx(tmp_path, toy_data, tiny_model, *checkpoints)
    run_case(case, ctx, capsys, monkeypatch)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path: Path, toy_data: Path, tiny_model: Path, checkpoints: tuple[Path, Path],
                                 capsys: Any, monkeypatch: Any) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        case = Case("read-only", lambda c: c.train(output_dir=str(ro / "run")), ("not writable",))
        run_case(case, Ctx(tmp_path, toy_data, tiny_model, *checkpoints), capsys, monkeypatch)
    finally:
        ro.chmod(0o700)
