"""Print the mutation score of the last `mutmut run` (what `make mutation` reports).

Reads mutmut's per-file results (``mutants/**/*.py.meta``). The score is the share of
mutants killed (a test failed, or the run timed out) among those that can be killed:
mutants listed in ``ci/equivalent_mutants.txt`` behave exactly like the original code
(each line there names the mutant and says why), so no test can kill them and they are
left out. Lists the survivors, so each one is either killed by a new test or argued
equivalent in that file. Exits 1 below ``--minimum`` (90 by default).

Usage: python ci/mutation_score.py [--minimum PERCENT]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "ci" / "equivalent_mutants.txt"

# mutmut's exit codes (mutmut.stats.status_by_exit_code).
_KILLED = {1, 3, 24, -24, 36, 152, 255}  # a failing test, pytest's internal error, or a timeout
_SURVIVED = {0}


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minimum", type=float, default=90.0, help="fail below this score (percent)")
    args = parser.parse_args(argv)
    codes = results(ROOT / "mutants")
    if not codes:
        print("mutation_score: no results under mutants/; run `make mutation`", file=sys.stderr)
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
    return 0 if score >= args.minimum and not stale else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
