"""Training memory of what the callbacks keep alive (issue 18): ``training_memory.py``
with glibc's malloc mmap threshold fixed at 128 KiB in every child (now, previous and
plain training alike), for plain training, pruning, QAT and the full stack.

With glibc's defaults a freed block below the (rising) mmap threshold stays in the
process, so peak resident memory also counts the transient effective weights of earlier
layers after they were freed; ``training_memory.py`` reports that, what a user's process
gets by default, and this one what is alive (see its docstring).

    python benchmarks/training_memory_live.py
"""

from __future__ import annotations

from training_memory import main

if __name__ == "__main__":
    main(["--mmap-threshold", str(128 * 1024), "--configs", "plain,pruning,qat,stack"])
