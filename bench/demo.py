"""`make demo` for several seeds: each stage's score, its change from the stage before it with the paired 95%
interval, and the wall and CPU seconds of its training, one JSON line per stage and seed.

Each seed runs the demo in its own child process (`python -m tunesmith.demo --seed N`), so every seed pays the
first model import, as `make demo` does; the whole run's wall and CPU time and the load average come with it.

    python bench/demo.py --seeds 0 1 2 --workdir /tmp/bench-demo > lines.jsonl
    python bench/demo.py --markdown lines.jsonl      # the per-stage table of bench/RESULTS.md

With --ablate-pretrain, each demo also runs SFT alone on the base (`tunesmith.demo --ablate-pretrain`: the same
data, settings and seed) and prints whether pretraining helped SFT: the paired change in SFT's exact match and in
its island answers on the same held-out rows, with and without the self-supervised stage before it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, print_line  # noqa: E402


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


ABLATION_STAGE = "pretrain -> sft (ablation)"


def run_seed(seed: int, workdir: Path, extra: list[str]) -> list[dict]:
    """One demo run; its stages.json rows (and its pretraining ablation, when it ran one), each with the seed, plus
    one row for the whole run."""
    name = f"seed{seed}"
    out = workdir / name
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load_before = [round(x, 2) for x in os.getloadavg()]
    wall, cpu = time.perf_counter(), children_cpu_s()
    log = workdir / f"{name}.log"
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.run([sys.executable, "-m", "tunesmith.demo", "--seed", str(seed), "--out", str(out), *extra],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    total = {"bench": "demo", "seed": seed, "run": name, "stage": "whole demo", "exit_code": code,
             "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(children_cpu_s() - cpu, 1),
             "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
             "cpus": os.cpu_count(), "log": str(log)}
    table = out / "stages.json"
    if not table.exists():
        return [{**total, "error": f"no {table}: see {log}"}]
    summary = json.loads(table.read_text(encoding="utf-8"))
    rows = [{"bench": "demo", "seed": seed, "run": name, **row} for row in summary["stages"]]
    if "ablation" in summary:  # --ablate-pretrain: what pretraining gave SFT
        rows.append({"bench": "demo", "seed": seed, "run": name, "stage": ABLATION_STAGE, **summary["ablation"]})
    return [*rows, total]


def _change(entry: dict | None, scale: float, unit: str, digits: int = 1) -> str:
    if not entry:
        return ""
    lo, hi = entry["ci"]
    f = f"{{:+.{digits}f}}"
    return f"{f.format(scale * entry['delta'])}{unit} ({f.format(scale * lo)} to {f.format(scale * hi)}) {entry['verdict']}"


def markdown(paths: list[Path]) -> str:
    """The per-stage table (one row per seed and stage) from the JSON lines this script printed."""
    lines_in = [json.loads(line) for p in paths for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    ablation = [r for r in lines_in if r["stage"] == ABLATION_STAGE]
    rows = [r for r in lines_in if r not in ablation]
    lines = ["| seed | stage | exact match | change vs previous stage (95% CI) | island right | domain ppl | change vs "
             "previous (95% CI) | train wall s | train CPU s | eval wall s | eval CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["stage"] == "whole demo")):
        if r["stage"] == "whole demo":
            lines.append(f"| {r['seed']} | **whole demo** (exit {r['exit_code']}) | | | | | | {r['wall_s']:.0f} | "
                         f"{r['cpu_s']:.0f} | | |")
            continue
        lines.append(
            f"| {r['seed']} | {r['stage']} | {100 * r['exact_match']:.1f}% | "
            f"{_change(r.get('exact_match_delta'), 100, ' pt')} | {100 * r['island_right']:.1f}% | "
            f"{r['domain text perplexity']:.2f} | "
            f"{_change(r.get('domain text perplexity_delta'), 1, '', 2)} | {r['train_wall_s']:.0f} | "
            f"{r['train_cpu_s']:.0f} | {r.get('eval_wall_s', 0):.0f} | {r.get('eval_cpu_s', 0):.0f} |")
    if ablation:
        lines += ["", "| seed | SFT exact match after pretrain | SFT exact match on the base | change (95% CI) | "
                  "island right after pretrain | island right on the base | change (95% CI) |", "|---|---|---|---|---|---|---|"]
        for r in sorted(ablation, key=lambda r: r["seed"]):
            em, isl = r["exact_match"], r["tunesmith.demo:island_right"]
            lines.append(f"| {r['seed']} | {100 * em['with']:.1f}% | {100 * em['without']:.1f}% | "
                         f"{_change(em, 100, ' pt')} | {100 * isl['with']:.1f}% | {100 * isl['without']:.1f}% | "
                         f"{_change(isl, 100, ' pt')} |")
    return "\n".join(lines)


def main() -> int:
    """Run the demo once per seed and print every stage's row as a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-demo"))
    parser.add_argument("--markdown", type=Path, nargs="+", metavar="LINES",
                        help="print the per-stage table from earlier output of this script, and run nothing")
    parser.add_argument("--ablate-pretrain", action="store_true",
                        help="also run SFT on the base alone per seed: did pretraining help SFT?")
    parser.add_argument("demo_args", nargs="*", help="further options for tunesmith.demo (after --)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for seed in args.seeds:
        extra = [*args.demo_args, *(["--ablate-pretrain"] if args.ablate_pretrain else [])]
        for row in run_seed(seed, args.workdir, extra):
            print_line(row)
            failed += bool(row.get("exit_code"))
    print(f"wrote: {', '.join(str(args.workdir / f'seed{s}') for s in args.seeds)} (runs, stages.json, logs)",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
