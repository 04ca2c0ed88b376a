"""Report tables, statistics and outputs recomputed from synthetic results.json files."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from metaxl.errors import MetaXLError
from metaxl.report import cell_stats, coverage_markdown, make_report, paired_stats

REPO = Path(__file__).resolve().parents[1]
RELATED = {"masakhaner2:luo": "masakhaner2:swa", "masakhaner2:wol": "masakhaner2:fr"}


def related(target: str) -> tuple[str, str]:
    if target not in RELATED:
        raise MetaXLError(f"no related language for {target}")
    return RELATED[target], "test"


def write_run(
    root: Path,
    name: str,
    *,
    method: str,
    target: str,
    source: list[str] | None,
    seed: int,
    f1: float | None,
    status: str = "finished",
    source_size: int | None = 1000,
    task: str = "ner",
    **config: object,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "method": method,
        "target": target,
        "source": source or [],
        "seed": seed,
        "source_size": source_size,
        "task": task,
        **config,
    }
    res: dict = {
        "status": status,
        "config": cfg,
        "method": method,
        "task": task,
        "target": target,
        "source": source or [],
        "seed": seed,
        "source_size": source_size,
    }
    if f1 is not None:
        res.update(dev={"f1": f1 + 1, "precision": 1.0}, test={"f1": f1, "precision": 2.0}, best_epoch=1)
    (d / "results.json").write_text(json.dumps(res))
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "config.yaml").write_text("not a run\n")  # must not be read as a run
    return d


# (method, source kind) -> target -> [seed1, seed2, seed3]
VALUES = {
    ("target-only", None): {"masakhaner2:luo": [50.0, 52.0, 51.0], "masakhaner2:wol": [40.0, 41.0, 45.0]},
    ("jt", "en"): {"masakhaner2:luo": [60.0, 62.0, 64.0], "masakhaner2:wol": [55.0, 57.0, 53.0]},
    ("metaxl", "en"): {"masakhaner2:luo": [63.0, 62.5, 66.0], "masakhaner2:wol": [58.0, 56.0, 57.5]},
    ("jt", "related"): {"masakhaner2:luo": [70.0, 71.0, 72.0], "masakhaner2:wol": [61.0, 60.0, 62.0]},
    ("metaxl", "related"): {"masakhaner2:luo": [71.0, 73.5, 71.5], "masakhaner2:wol": [63.0, 59.0, 64.0]},
}


def make_runs(root: Path) -> None:
    for (method, kind), per_target in VALUES.items():
        for target, vals in per_target.items():
            for seed, v in enumerate(vals, start=1):
                src = None if kind is None else ["masakhaner2:en"] if kind == "en" else [RELATED[target]]
                name = f"ner/{target.split(':')[1]}/{method}/{kind}/seed{seed}"
                write_run(
                    root,
                    name,
                    method=method,
                    target=target,
                    source=src,
                    seed=seed,
                    f1=v,
                    rtn_layers=[12],
                    lr=3e-5,
                )
    write_run(
        root,
        "ner/luo/metaxl/en/seed9",
        method="metaxl",
        target="masakhaner2:luo",
        source=["masakhaner2:en"],
        seed=9,
        f1=None,
        status="running",
    )
    bad = root / "ner/wol/metaxl/en/seed7"
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text("method: metaxl\n")
    (bad / "FAILED").write_text(
        "exit_code: 1\nreason: exited with code 1\n--- last lines of train.log ---\nboom\n"
    )
    broken = root / "ner/wol/jt/en/seed8"
    broken.mkdir(parents=True)
    (broken / "results.json").write_text("{not json")


def md_table(text: str, heading: str) -> list[list[str]]:
    lines = text.split(f"## {heading}\n", 1)[1].strip().splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_tables_stats_and_outputs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_runs(runs)
    res = make_report(runs, related=related)
    assert res.counts == {
        "finished": 30,
        "unfinished": 1,
        "failed": 1,
        "unreadable": 1,
        "read": 33,
        "duplicates": 0,
        "no_metric": 0,
    }
    assert [t.title for t in res.tables] == ["NER, source size 1000"]
    table = res.tables[0]
    assert table.columns == ["luo", "wol"]
    assert [r.label for r in table.rows] == [
        "target only",
        "JT (en)",
        "MetaXL (en)",
        "JT (related)",
        "MetaXL (related)",
    ]
    row = {r.label: r for r in table.rows}
    # hand-computed cells
    c = row["JT (en)"].cells["masakhaner2:luo"]
    assert (c.mean, c.std, c.n) == (62.0, 2.0, 3)
    wol = VALUES[("metaxl", "related")]["masakhaner2:wol"]
    c = row["MetaXL (related)"].cells["masakhaner2:wol"]
    assert c.mean == pytest.approx(statistics.mean(wol)) and c.std == pytest.approx(statistics.stdev(wol))
    # avg: mean of the per-target means; std over seeds of the per-seed averages
    per_seed = [(a + b) / 2 for a, b in zip(*VALUES[("target-only", None)].values(), strict=True)]
    avg = row["target only"].avg
    assert avg.mean == pytest.approx(statistics.mean(per_seed)) and avg.std == pytest.approx(
        statistics.stdev(per_seed)
    )

    # paired MetaXL - JT per source kind over (language, seed) pairs
    assert [(c.kind, c.treatment, c.control) for c in res.comparisons] == [
        ("en", "MetaXL (en)", "JT (en)"),
        ("related", "MetaXL (related)", "JT (related)"),
    ]
    for comp, kind in zip(res.comparisons, ("en", "related"), strict=True):
        a = [v for t in RELATED for v in VALUES[("metaxl", kind)][t]]
        b = [v for t in RELATED for v in VALUES[("jt", kind)][t]]
        d = [x - y for x, y in zip(a, b, strict=True)]
        n, m, sd = len(d), statistics.mean(d), statistics.stdev(d)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        s = comp.stats
        assert s.n == 6 and s.mean == pytest.approx(m)
        assert (s.ci_low, s.ci_high) == (pytest.approx(m - half), pytest.approx(m + half))
        assert (s.wins, s.losses, s.ties) == (
            sum(x > 0 for x in d),
            sum(x < 0 for x in d),
            sum(x == 0 for x in d),
        )
        t_stat = m / (sd / math.sqrt(n))
        assert s.t_p == pytest.approx(2 * stats.t.sf(abs(t_stat), n - 1))
        assert s.wilcoxon_p == pytest.approx(stats.wilcoxon(d).pvalue)

    # report.md: the counts line, the table shape, significance and failures
    text = res.markdown_path.read_text()
    assert (
        "Read 33 run folders" in text and "30 finished, 1 skipped unfinished, 1 failed, 1 unreadable" in text
    )
    rows = md_table(text, "NER, source size 1000")
    assert rows[0] == ["setting", "luo", "wol", "avg"]
    assert len(rows) == 2 + 5 and all(len(r) == 4 for r in rows)
    assert rows[4][0] == "MetaXL (en)"
    assert rows[3][1] == "62.00 ± 2.00"
    assert "(n=" not in text
    assert "| NER, source size 1000 | en | MetaXL (en) − JT (en) | 6 |" in text
    assert "`ner/wol/metaxl/en/seed7` | exit code 1: exited with code 1" in text
    assert "ner/luo/metaxl/en/seed9" in text

    # CSV: same shape, full-precision numbers
    with open(res.out_dir / "ner_n1000.csv") as f:
        data = list(csv.reader(f))
    assert data[0] == [
        "setting",
        "luo mean",
        "luo std",
        "luo n",
        "wol mean",
        "wol std",
        "wol n",
        "avg mean",
        "avg std",
        "avg n",
        "avg seeds min",
        "avg seeds max",
    ]
    assert [r[0] for r in data[1:]] == [r.label for r in table.rows]
    assert float(data[2][1]) == 62.0 and float(data[2][2]) == 2.0 and data[2][3] == "3"
    with open(res.out_dir / "significance.csv") as f:
        sig = list(csv.DictReader(f))
    assert float(sig[0]["mean_diff"]) == pytest.approx(res.comparisons[0].stats.mean)
    # Holm over the report's two comparisons: the smaller p doubled, the larger kept (never below it)
    p1, p2 = (c.stats.t_p for c in res.comparisons)
    lo = min(1.0, 2 * min(p1, p2))
    want = [lo if p == min(p1, p2) else max(lo, p) for p in (p1, p2)]
    assert [float(r["ttest_p_holm"]) for r in sig] == pytest.approx(want)
    assert "| t-test p | Wilcoxon p | Holm p |" in text and "2 comparison(s) of this report" in text
    # by target: each target's seeds averaged first, then the same statistics over targets
    per: dict[str, list[float]] = {}
    for target, _, x, y in res.comparisons[0].pairs:
        per.setdefault(target, []).append(x - y)
    d = [sum(v) / len(v) for v in per.values()]
    m, sd = sum(d) / len(d), statistics.stdev(d)
    assert int(sig[0]["targets"]) == len(d) == 2 and len(res.comparisons[0].pairs) == 6
    assert float(sig[0]["target_mean_diff"]) == pytest.approx(m)
    assert float(sig[0]["target_ttest_p"]) == pytest.approx(2 * stats.t.sf(abs(m / (sd / math.sqrt(2))), 1))
    assert int(sig[0]["target_wins"]) + int(sig[0]["target_losses"]) == 2
    assert "| NER, source size 1000 | en | MetaXL (en) − JT (en) | 2 |" in text
    png = res.out_dir / "ner_n1000.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # recomputable: a second report (its own output folder inside runs/ is ignored) is identical
    again = make_report(runs, related=related)
    assert again.markdown_path.read_text() == text


def test_uneven_seeds_sizes_variants_and_settings(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    t = "masakhaner2:luo"
    for seed, v in [(1, 60.0), (2, 61.0)]:
        write_run(runs, f"jt/{seed}", method="jt", target=t, source=["masakhaner2:en"], seed=seed, f1=v)
        write_run(
            runs,
            f"jt5k/{seed}",
            method="jt",
            target=t,
            source=["masakhaner2:en"],
            seed=seed,
            f1=v + 5,
            source_size=5000,
        )
        for layers in ([12], [0, 12]):
            write_run(
                runs,
                f"mx{len(layers)}/{seed}",
                method="metaxl",
                target=t,
                source=["masakhaner2:en"],
                seed=seed,
                f1=v + len(layers),
                rtn_layers=layers,
                hypergrad="exact",
            )
    write_run(runs, "to/1", method="target-only", target=t, source=None, seed=1, f1=50.0)
    write_run(
        runs,
        "sa/1",
        method="jt",
        target="nusax:balinese",
        source=["nusax:english"],
        seed=1,
        f1=70.0,
        task="sa",
        sa_labels="binary",
        source_size=None,
    )
    write_run(
        runs,
        "sa3/1",
        method="jt",
        target="nusax:balinese",
        source=["nusax:english"],
        seed=1,
        f1=50.0,
        task="sa",
        sa_labels="3way",
        source_size=None,
    )
    write_run(
        runs,
        "sa3/2",
        method="jt",
        target="nusax:balinese",
        source=["nusax:english"],
        seed=1,
        f1=99.0,
        task="sa",
        sa_labels="3way",
        source_size=None,
    )  # duplicate seed: ignored
    res = make_report(runs, tmp_path / "out", related=None)
    titles = [tb.title for tb in res.tables]
    assert titles == [
        "NER, source size 1000",
        "NER, source size 5000",
        "SA (3way labels), source size all",
        "SA (binary labels), source size all",
    ]
    t1000 = res.tables[0]
    assert [r.label for r in t1000.rows] == [
        "target only",
        "JT (en)",
        "MetaXL (en; L12)",
        "MetaXL (en; L0+12)",
    ]
    assert [r.label for r in res.tables[1].rows] == ["target only", "JT (en)"]  # target-only in every table
    text = res.markdown_path.read_text()
    rows = md_table(text, "NER, source size 1000")
    assert rows[1 + 1][1] == "50.00 (n=1)" and rows[1 + 2][1] == "60.50 ± 0.71 (n=2)"
    assert res.counts["duplicates"] == 1
    assert res.tables[2].rows[0].cells["nusax:balinese"].mean == 50.0
    # one comparison per MetaXL setting, paired with the same JT runs
    assert [(c.treatment, c.stats.n, c.stats.mean) for c in res.comparisons] == [
        ("MetaXL (en; L12)", 2, 1.0),
        ("MetaXL (en; L0+12)", 2, 2.0),
    ]
    assert math.isnan(res.comparisons[0].stats.t_p)  # constant differences: t-test undefined
    for slug in ("ner_n1000", "ner_n5000", "sa-binary_nall", "sa-3way_nall"):
        assert (tmp_path / "out" / f"{slug}.csv").exists() and (tmp_path / "out" / f"{slug}.png").exists()


def test_average_of_targets_with_different_seed_counts_names_both_counts(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, v in [(1, 60.0), (2, 62.0), (3, 64.0)]:  # luo: 3 seeds, mean 62
        write_run(runs, f"luo/{seed}", method="jt", target="masakhaner2:luo", source=["masakhaner2:en"],
                  seed=seed, f1=v)
    write_run(runs, "wol/1", method="jt", target="masakhaner2:wol", source=["masakhaner2:en"], seed=1, f1=40.0)
    res = make_report(runs, tmp_path / "out", related=None)
    avg = res.tables[0].rows[0].avg
    assert (avg.mean, avg.n, avg.seed_counts) == (51.0, 1, (1, 3))  # mean of the cell means; ± over seed 1 only
    rows = md_table(res.markdown_path.read_text(), "NER, source size 1000")
    assert rows[2] == ["JT (en)", "62.00 ± 2.00 (n=3)", "40.00 (n=1)", "51.00 (n=1–3)"]
    # progress: how many of the table's targets have each seed
    section = res.markdown_path.read_text().split("## Runs finished per seed\n", 1)[1].split("\n## ", 1)[0]
    assert [line for line in section.splitlines() if line.startswith("|")] == [
        "| table | setting | seed 1 | seed 2 | seed 3 |",
        "|---|---|---:|---:|---:|",
        "| NER, source size 1000 | JT (en) | 2/2 | 1/2 | 1/2 |",
    ]
    # the CSV says the same: avg n is the seeds its std is over (1), seeds min/max the targets' counts
    data = list(csv.DictReader((tmp_path / "out" / "ner_n1000.csv").open()))
    jt = next(r for r in data if r["setting"] == "JT (en)")
    assert (jt["luo n"], jt["wol n"]) == ("3", "1")
    assert (float(jt["avg mean"]), jt["avg n"], jt["avg seeds min"], jt["avg seeds max"]) == (51.0, "1", "1", "3")
    write_run(runs, "wol/3", method="jt", target="masakhaner2:wol", source=["masakhaner2:en"], seed=3, f1=41.0)
    write_run(runs, "to/5", method="target-only", target="masakhaner2:luo", source=None, seed=5, f1=30.0)
    res = make_report(runs, tmp_path / "out", related=None)
    assert coverage_markdown(res.tables, {"NER, source size 1000": "NER"}).splitlines()[2:] == [
        "| NER | target only | – | – | – | 1/2 |",
        "| NER | JT (en) | 2/2 | 1/2 | 2/2 | – |",
    ]


def test_helpers() -> None:
    c = cell_stats([1.0])
    assert c.n == 1 and c.mean == 1.0 and math.isnan(c.std)
    s = paired_stats([1.0, 2.0], [1.0, 2.0])
    assert (s.ties, s.mean) == (2, 0.0) and math.isnan(s.wilcoxon_p)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(MetaXLError, match="runs folder not found"):
        make_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetaXLError, match="no runs under"):
        make_report(tmp_path / "empty")
    write_run(
        tmp_path / "r", "a", method="jt", target="masakhaner2:luo", source=["masakhaner2:en"], seed=1, f1=1.0
    )
    with pytest.raises(MetaXLError, match="available test metrics: f1, precision"):
        make_report(tmp_path / "r", metric="accuracy")
    res = make_report(tmp_path / "r", metric="precision", split="dev", plots=False)
    assert res.tables[0].rows[0].cells["masakhaner2:luo"].mean == 1.0
    assert not list((tmp_path / "r" / "report").glob("*.png"))


def test_module_cli(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_runs(runs)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    r = subprocess.run(
        [sys.executable, "-m", "metaxl.report", str(runs), "--out", str(tmp_path / "rep")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "30 finished" in r.stdout and (tmp_path / "rep" / "report.md").exists()
    r = subprocess.run(
        [sys.executable, "-m", "metaxl.report", str(tmp_path / "missing")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "runs folder not found" in r.stderr and "Traceback" not in r.stderr


def test_rows_missing_targets_get_an_average_over_the_shared_ones(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in (1, 2):
        for t, v in (("masakhaner2:luo", 60.0), ("masakhaner2:wol", 40.0)):
            write_run(runs, f"jt/{t}/{seed}", method="jt", target=t, source=["masakhaner2:en"], seed=seed,
                      f1=v + seed)
        write_run(runs, f"mx/{seed}", method="metaxl", target="masakhaner2:luo", source=["masakhaner2:en"],
                  seed=seed, f1=70.0 + 2 * seed)
    out = tmp_path / "report"
    make_report(runs, out=out)
    text = (out / "report.md").read_text()
    assert "| setting | luo | wol | avg | avg of the 1 shared |" in text
    # JT: avg over both targets 51.5 (seeds 1, 2: 51, 52), over the shared one (luo) 61.5 ± std(61, 62)
    jt_line = next(line for line in text.splitlines() if line.startswith("| JT (en)"))
    assert jt_line.endswith(f"| 51.50 ± {statistics.stdev([51, 52]):.2f} | 61.50 ± {statistics.stdev([61, 62]):.2f} |")
    mx_line = next(line for line in text.splitlines() if line.startswith("| MetaXL (en)"))
    assert mx_line.endswith(f"| 73.00 ± {statistics.stdev([72, 74]):.2f} † | 73.00 ± {statistics.stdev([72, 74]):.2f} |")
    rows = list(csv.reader((out / next(p.name for p in out.glob("*.csv") if p.name.startswith("ner"))).open()))
    assert rows[0][-5:] == ["avg shared mean", "avg shared std", "avg shared n", "avg shared seeds min",
                            "avg shared seeds max"]


def test_one_factor_at_a_time_rows_are_labelled_by_what_they_change(tmp_path: Path) -> None:
    """An ablation: a reference MetaXL run and variations of one setting each. Labels name only the
    changed setting; the reference's settings are listed once; a non-semantic key (save_state)
    does not keep a run from its JT pair."""
    runs = tmp_path / "runs"
    t, src = "nusax:balinese", ["nusax:indonesian"]
    kw = dict(target=t, source=src, seed=1, task="sa", sa_labels="binary", source_size=200)
    write_run(runs, "jt", method="jt", f1=80.0, save_state=False, **kw)
    write_run(runs, "ref", method="metaxl", f1=74.0, meta_lr=1e-4, hypergrad="exact", save_state=False, **kw)
    write_run(runs, "ref-again", method="metaxl", f1=75.0, meta_lr=1e-4, hypergrad="exact", **{**kw, "seed": 2})
    write_run(runs, "mlr", method="metaxl", f1=77.0, meta_lr=1e-3, hypergrad="exact", save_state=True, **kw)
    write_run(runs, "fd", method="metaxl", f1=81.0, meta_lr=1e-4, hypergrad="finite-difference", **kw)
    res = make_report(runs, tmp_path / "out", related=None)
    (table,) = res.tables
    assert [r.label for r in table.rows] == ["JT (related)", "MetaXL (related)",
                                             "MetaXL (related; FD)", "MetaXL (related; meta_lr=0.001)"]
    assert table.common == ["MetaXL: exact; meta_lr=0.0001"]
    assert "the most common: MetaXL: exact; meta_lr=0.0001." in res.markdown_path.read_text()
    deltas = {c.treatment: c.stats.mean for c in res.comparisons}
    assert deltas == {"MetaXL (related)": -6.0, "MetaXL (related; FD)": 1.0,
                      "MetaXL (related; meta_lr=0.001)": -3.0}


def test_holm_adjustment() -> None:
    from metaxl.report import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    out = holm([math.nan, 0.02, math.nan])  # undefined p-values are not part of the family
    assert math.isnan(out[0]) and math.isnan(out[2]) and out[1] == pytest.approx(0.02)
    assert holm([]) == []


def test_bar_chart_legend_does_not_cover_the_target_names(tmp_path: Path) -> None:
    """Nine columns turn the target names by 30 degrees; the legend used to sit under the axes, on
    top of them (seen on the study's SA chart once toba_batak made it eight targets)."""
    from metaxl.report import bar_figure

    runs = tmp_path / "runs"
    targets = [f"nusax:{name}" for name in ("acehnese", "balinese", "banjarese", "buginese", "madurese",
                                            "minangkabau", "ngaju", "toba_batak")]
    for i, t in enumerate(targets):
        write_run(runs, f"to/{i}", method="target-only", target=t, source=None, seed=1, f1=70.0 + i,
                  task="sa", source_size=None)
        for j, (method, src) in enumerate((("jt", "nusax:english"), ("metaxl", "nusax:english"),
                                          ("jt", "nusax:indonesian"), ("metaxl", "nusax:indonesian"))):
            write_run(runs, f"{method}/{src}/{i}", method=method, target=t, source=[src], seed=1,
                      f1=72.0 + i + j, task="sa")
    table = make_report(runs, out=tmp_path / "report", related=lambda t: ("nusax:indonesian", "test")).tables[0]
    assert len(table.targets) == 8 and len(table.rows) == 5
    fig = bar_figure(table, "test f1")
    renderer = fig.canvas.get_renderer()  # the Agg canvas bar_figure attached
    fig.draw(renderer)
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    names = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "avg" and all(n.width > 0 for n in names)
    assert not any(legend.overlaps(n) for n in names)
    assert not legend.overlaps(ax.get_window_extent(renderer))  # nor the bars


def test_pairs_csv_and_paired_figure_show_every_pair(tmp_path: Path) -> None:
    from metaxl.report import paired_figure

    runs = tmp_path / "runs"
    make_runs(runs)
    res = make_report(runs, related=related)
    with open(res.out_dir / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    want = [(c.kind, t, s, m, j) for c in res.comparisons for t, s, m, j in c.pairs]
    assert len(rows) == len(want) == 12  # 2 source kinds x 2 targets x 3 seeds
    for r, (kind, t, s, m, j) in zip(rows, want, strict=True):
        assert (r["source"], r["target"], int(r["seed"])) == (kind, t, s)
        assert float(r["diff"]) == pytest.approx(m - j)
        assert float(r["treatment_value"]) - float(r["control_value"]) == pytest.approx(m - j)
        assert (m, j) == (VALUES[("metaxl", kind)][t][s - 1], VALUES[("jt", kind)][t][s - 1])
    text = res.markdown_path.read_text()
    assert "![Paired differences MetaXL − JT](paired.png)" in text
    assert (res.out_dir / "paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = paired_figure(res.comparisons)
    ax = fig.axes[0]
    # one dot per pair at its difference, one black diamond per comparison at the mean difference
    dots = sorted(float(x) for coll in ax.collections for x, _ in coll.get_offsets()
                  if len(coll.get_offsets()) and coll.get_facecolor()[0][:3].tolist() != [0.0, 0.0, 0.0])
    assert dots == pytest.approx(sorted(m - j for _, _, _, m, j in want))
    means = sorted(float(x) for coll in ax.collections if len(coll.get_offsets())
                   and coll.get_facecolor()[0][:3].tolist() == [0.0, 0.0, 0.0] for x, _ in coll.get_offsets())
    assert means == pytest.approx(sorted(c.stats.mean for c in res.comparisons))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1].startswith("MetaXL (en) − JT (en)\nn=6")  # the first comparison on top

    no_plots = make_report(runs, out=tmp_path / "np", related=related, plots=False)
    assert not (no_plots.out_dir / "paired.png").exists() and (no_plots.out_dir / "pairs.csv").exists()
