#!/usr/bin/env python
"""The issue-29 tuning table: dev F1 (the only score used to choose) and the RTN diagnostics of
every finished run under a folder (default: results/tuning_29).

    python examples/tuning/summary.py results/tuning_29

Run folders are named ``<target>-<source>-<setting>-s<seed>``; the table has one row per run, with
the best dev F1, the epoch it was reached, the last epoch's RTN diagnostics (relative change of the
probe batch's source vectors, weight drift from the start, hypergradient signal-to-noise, the meta
loss change of phi's step) and the wall time; then each setting's dev F1 minus JT's, paired by
target, source and seed. Test F1 is not shown: it plays no part in the choice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*/results.json")):
        res = json.loads(path.read_text())
        if res.get("status") != "finished":
            continue
        last = res["epochs"][-1].get("rtn") or {}
        out.append({
            "run": path.parent.name, "method": res["method"], "best_epoch": res["best_epoch"],
            "dev_f1": res["dev"]["f1"], "rel_change_start": (res.get("rtn_init") or {}).get("rel_change"),
            "rel_change": last.get("rel_change"), "drift": last.get("weight_drift"),
            "snr": last.get("hypergrad_snr"),
            "meta_step": last.get("meta_step_change"),  # (runs before it was recorded: rounded away)
            "norm_ratio": last.get("norm_ratio"),
            "minutes": res.get("wall_seconds", 0) / 60,
        })
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def against_jt(table: list[dict]) -> list[str]:
    """Each setting's dev F1 minus JT's, paired by (target, source, seed): one line per setting."""
    runs = {}
    for r in table:
        stem, seed = r["run"].rsplit("-s", 1)
        target, source, setting = stem.split("-", 2)
        runs[(target, source, setting, seed)] = r["dev_f1"]
    out = []
    for setting in sorted({k[2] for k in runs} - {"jt"}):
        pairs = [(f"{t}-s{s}", f - runs[(t, src, "jt", s)]) for (t, src, st, s), f in sorted(runs.items())
                 if st == setting and (t, src, "jt", s) in runs]
        if pairs:
            mean = sum(d for _, d in pairs) / len(pairs)
            out.append(f"| {setting} | {len(pairs)} | {mean:+.2f} | " + ", ".join(f"{k} {d:+.2f}" for k, d in pairs) + " |")
    return out


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "results/tuning_29")
    table = rows(folder)
    if not table:
        print(f"no finished runs under {folder}", file=sys.stderr)
        return 1
    print("| run | dev F1 | best epoch | RTN change (start -> end) | norm ratio | weight drift | hypergrad SNR | "
          "meta-loss change of phi's step | minutes |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in table:
        change = "-" if r["rel_change"] is None else f"{fmt(r['rel_change_start'], '.3f')} -> {r['rel_change']:.3f}"
        print(f"| {r['run']} | {r['dev_f1']:.2f} | {r['best_epoch']} | {change} | {fmt(r['norm_ratio'], '.2f')} | "
              f"{fmt(r['drift'], '.3f')} | "
              f"{fmt(r['snr'], '.2f')} | {fmt(r['meta_step'], '+.1e')} | {r['minutes']:.0f} |")
    paired = against_jt(table)
    if paired:
        print("\nDev F1 minus JT's, paired by target, source and seed:\n")
        print("| setting | pairs | mean | pairs (target-seed: difference) |")
        print("|---|---:|---:|---|")
        print("\n".join(paired))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
