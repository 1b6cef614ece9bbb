"""`make bench`: run every benchmark here and rewrite BENCHMARKS.md with what they print.

Each benchmark prints a markdown section (a heading line starting with '#', a table,
and its target). Nothing in BENCHMARKS.md is written by hand: every figure there comes
from the run recorded beside it.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
NOISE_NOTE = (
    " On this 2-core shared machine, repeated runs of the same overhead benchmark moved by"
    " up to about 12% (QAT int8 with dynamic activations: 1.098x in one run, 0.981x in the"
    " next), so a ratio within that distance of its target is not evidence either way."
)
SKIP = {"common.py", "run_all.py"}


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP)
    if len(sys.argv) > 1:
        scripts = [p for p in scripts if p.stem in sys.argv[1:]]
    sections = []
    for script in scripts:
        print(f"running {script.name} ...", flush=True)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=HERE.parent)
        took = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-4000:], sep="\n")
            return result.returncode
        lines = [line for line in result.stdout.splitlines() if line.startswith(("#", "|", "Target"))]
        heading, body = lines[0].lstrip("# "), lines[1:]
        sections.append(
            f"## {script.stem}\n\n{heading}\n\nCommand: `python benchmarks/{script.name}`"
            f" ({took:.0f} s, {datetime.date.today().isoformat()})\n\n" + "\n".join(body)
        )
        print("\n".join(lines), flush=True)
    today = datetime.date.today().isoformat()
    # `python benchmarks/run_all.py NAME` refreshes NAME's section and keeps the others.
    target = HERE.parent / "BENCHMARKS.md"
    kept = _sections(target.read_text()) if target.exists() and len(sys.argv) > 1 else {}
    kept.update({section.split("\n", 1)[0][3:]: section for section in sections})
    header = (
        "# Benchmarks\n\n"
        f"Written by `make bench` (last run {today}). Each table is measured side by side in one"
        " process, so ratios are comparable even when the shared machine's absolute speed drifts."
        + NOISE_NOTE
        + "\n\n"
    )
    target.write_text(header + "\n\n".join(kept[name] for name in sorted(kept)) + "\n")
    return 0


def _sections(text: str) -> dict:
    parts = text.split("\n## ")[1:]
    return {part.split("\n", 1)[0]: "## " + part.strip() for part in parts}


if __name__ == "__main__":
    raise SystemExit(main())
