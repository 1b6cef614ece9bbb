"""Print the mutation score of the last `mutmut run` (what `make mutation` reports).

Reads mutmut's per-file results (``mutants/**/*.py.meta``). The score is the share of
mutants killed (a test failed, or the run timed out) among those that can be killed:
mutants listed in ``ci/equivalent_mutants.txt`` behave exactly like the original code
(each line there names the mutant and says why), so no test can kill them and they are
left out. Lists the survivors, so each one is either killed by a new test or argued
equivalent in that file. Exits 1 below ``--minimum`` (90 by default).

``--record`` (what ``make mutation`` passes) also keeps the measured figures in
``benchmarks/results.json`` and rewrites BENCHMARKS.md from it with the benchmarks'
renderer (``benchmarks/run_all.py``), as the row "mutation score of the numeric core";
it refuses a run with mutants that were never run (an interrupted ``mutmut run``).

Usage: python ci/mutation_score.py [--minimum PERCENT] [--mutants DIR]
                                   [--record --seconds S]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "ci" / "equivalent_mutants.txt"
RESULTS_KEY = "mutation_score"  # its entry in benchmarks/results.json
AREA = "test quality"  # its summary table in BENCHMARKS.md (benchmarks/run_all.py AREAS)

# mutmut's exit codes (mutmut.stats.status_by_exit_code).
_KILLED = {1, 3, 24, -24, 36, 152, 255}  # a failing test, pytest's internal error, or a timeout
_TIMEOUT = {24, -24, 36, 152, 255}  # of those: mutmut's timeouts and CPU-time-limit kills
_SURVIVED = {0}
_UNTESTED = {5, 33}  # no test in the selection covers the mutated function


def equivalent_mutants(path: Path | None = None) -> dict[str, str]:
    """``{mutant name: reason}`` from lines ``name  # reason`` (of ``ci/equivalent_mutants.txt``)."""
    path = EQUIVALENT_FILE if path is None else path
    found: dict[str, str] = {}
    if not path.exists():
        return found
    for line in path.read_text().splitlines():
        name, _, reason = line.partition("#")
        if name.strip():
            found[name.strip()] = reason.strip()
    return found


def results(mutants: Path) -> dict[str, int | None]:
    """Every mutant's exit code, from mutmut's ``.meta`` files."""
    codes: dict[str, int | None] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def _run_all():
    """``benchmarks/run_all.py`` as a module (its ``render``, ``machine`` and file paths)."""
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commit(checkout: Path) -> str:
    """The commit ``checkout`` holds (the run's source and tests), ``+ uncommitted changes``
    when its tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def record(counts: dict, score: float, seconds: int, checkout: Path) -> None:
    """Keep this run's figures in benchmarks/results.json and rewrite BENCHMARKS.md."""
    run_all = _run_all()
    commit = _commit(checkout)
    results = json.loads(run_all.RESULTS.read_text()) if run_all.RESULTS.exists() else {}
    made = counts["made"]
    results[RESULTS_KEY] = {
        "command": "make mutation",
        "date": datetime.date.today().isoformat(),
        "machine": run_all.machine(),
        "seconds": seconds,
        "heading": f"mutation testing of the numeric core at commit {commit}",
        "body": [
            "mutmut over `quant/`, `sparsity/`, `distill/losses.py` and `formats/parity.py`"
            " (`[tool.mutmut]` in pyproject.toml), against the test files listed there.",
            "",
            "| mutants | count |",
            "|---|---|",
            f"| killed by a failing test | {counts['failed']} |",
            f"| killed by a timeout | {counts['timeout']} |",
            f"| survived | {counts['survived']} |",
            f"| no test covers it | {counts['untested']} |",
            f"| other outcomes (not killed) | {counts['other']} |",
            f"| equivalent, left out (`ci/equivalent_mutants.txt`) | {counts['equivalent']} |",
            f"| made | {made} |",
            f"Target (issue 15): at least 90% of non-equivalent mutants killed; {score:.1f}% were.",
        ],
        "rows": [{
            "area": AREA,
            "metric": "mutation score of the numeric core (killed of non-equivalent mutants)",
            "figure": f"{score:.1f}% ({counts['killed']} of {made - counts['equivalent']})",
            "target": ">= 90% (issue 15)",
        }],
    }
    run_all.RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    run_all.REPORT.write_text(run_all.render(results))
    print(f"recorded in {run_all.RESULTS.relative_to(ROOT)} and {run_all.REPORT.name}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minimum", type=float, default=90.0, help="fail below this score (percent)")
    parser.add_argument("--mutants", type=Path, default=None,
                        help="mutmut's results folder (default: mutants/ of this checkout)")
    parser.add_argument("--record", action="store_true",
                        help="keep the figures in benchmarks/results.json and rewrite BENCHMARKS.md")
    parser.add_argument("--seconds", type=int, default=None, help="how long the mutmut run took (with --record)")
    args = parser.parse_args(argv)
    if args.record and args.seconds is None:
        parser.error("--record needs --seconds: how long the mutmut run took")
    mutants = ROOT / "mutants" if args.mutants is None else args.mutants.resolve()
    codes = results(mutants)
    if not codes:
        where = "mutants/" if args.mutants is None else f"{mutants}/"
        print(f"mutation_score: no results under {where}; run `make mutation`", file=sys.stderr)
        return 1
    equivalent = equivalent_mutants()
    stale = sorted(set(equivalent) - set(codes))
    counted = {name: code for name, code in codes.items() if name not in equivalent}
    killed = sorted(name for name, code in counted.items() if code in _KILLED)
    survived = sorted(name for name, code in counted.items() if code in _SURVIVED)
    other = Counter(code for name, code in counted.items() if code not in _KILLED | _SURVIVED)
    if other:
        # not run (None), no covering test (33/5), skipped, suspicious: none counts as killed
        print(f"not killed, other outcomes (mutmut exit codes): {dict(other)}")
        survived += sorted(name for name, code in counted.items() if code not in _KILLED | _SURVIVED)
    score = 100.0 * len(killed) / max(1, len(counted))
    for name in survived:
        print(f"survived: {name}")
    for name in stale:
        print(f"ci/equivalent_mutants.txt names {name}, which this run did not make", file=sys.stderr)
    print(
        f"mutation score {score:.1f}%: {len(killed)} killed of {len(counted)} mutants"
        f" ({len(codes)} made, {len(codes) - len(counted)} equivalent)"
    )
    if args.record:
        if None in counted.values() or stale:
            print("mutation_score: not recorded: some mutants were never run, or"
                  " ci/equivalent_mutants.txt names mutants this run did not make", file=sys.stderr)
            return 1
        timeouts = sum(1 for code in counted.values() if code in _TIMEOUT)
        counts = {
            "made": len(codes),
            "equivalent": len(codes) - len(counted),
            "killed": len(killed),
            "failed": len(killed) - timeouts,
            "timeout": timeouts,
            "survived": sum(1 for code in counted.values() if code in _SURVIVED),
            "untested": sum(1 for code in counted.values() if code in _UNTESTED),
        }
        counts["other"] = len(counted) - counts["killed"] - counts["survived"] - counts["untested"]
        record(counts, score, args.seconds, mutants.parent)
    return 0 if score >= args.minimum and not stale else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
