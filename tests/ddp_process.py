"""Running a DDP test script (tests/scripts/ddp_*.py) as a real process tree.

Lightning's launcher starts rank 1 by re-running the script; rank 0 is the process this
module starts. Both get ``PYTHONFAULTHANDLER=1``, so a native abort (SIGABRT, SIGSEGV)
prints every thread's Python stack in the failure message instead of a bare
"terminate called ..." line.
"""

import faulthandler
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_compress.quant.nf4 import is_nf4

ROOT = Path(__file__).resolve().parents[1]
# Two gloo processes on the CPU whatever LC_TEST_ACCELERATOR says (a GPU run has one GPU).
ENV = {**{k: v for k, v in os.environ.items() if k != "LC_TEST_ACCELERATOR"}, "PYTHONFAULTHANDLER": "1"}
TIMEOUT_S = 300
DEADLINE_VAR = "LIGHTNING_COMPRESS_TEST_DEADLINE"


def run_script(script, *args, check: bool = True, cwd=ROOT, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` in ``cwd``, for at most ``timeout_s``; with ``check``,
    fail the test with the end of its output unless it exited 0."""
    # Both ranks arm their hang report against this deadline (rank 1 inherits the env).
    env = {**ENV, DEADLINE_VAR: str(time.time() + timeout_s)}
    result = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout_s, cwd=cwd, env=env)
    if check:
        assert result.returncode == 0, _crash_report(result.stdout) + result.stderr[-6000:]
    return result


def _crash_report(output: str) -> str:
    """The end of ``output``; from a rank's "Fatal Python error" on when there is one (its
    thread tracebacks come before a list of extension modules that would fill the tail)."""
    start = output.rfind("Fatal Python error")
    return output[start:start + 6000] if start >= 0 else output[-3000:]


def arm_hang_report() -> None:
    """Start of a DDP script: a rank still running shortly before the test gives up on
    it prints every thread's stack and exits, so a hang (a collective one rank never
    joins) fails with where each rank was instead of a bare timeout."""
    deadline = float(os.environ.get(DEADLINE_VAR, time.time() + TIMEOUT_S))
    faulthandler.dump_traceback_later(max(deadline - time.time() - 30, 1.0), exit=True)


def close_process_group() -> None:
    """End of a DDP script: destroy the process group while the interpreter is whole.

    Lightning destroys it in an atexit hook, during interpreter shutdown. One CI run saw
    rank 0 of the export script abort with "terminate called without an active
    exception" (exit -6), which is what a C++ thread destroyed while still running
    prints; it did not recur in 95 local runs of the DDP scripts. Destroying the group here, after a
    barrier, is torch's documented way to end a script's distributed work and keeps
    native teardown out of interpreter shutdown."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def assert_same(a, b, path: str = "") -> None:
    """``a`` and ``b`` (nested dicts, lists and tensors, as a rank saves its state) are
    equal, tensors bit for bit (an NF4 tensor by its codes and scalers); ``path`` names
    the first difference."""
    if isinstance(a, torch.Tensor):
        if is_nf4(a):
            assert torch.equal(a.quantized_data, b.quantized_data), path
            assert torch.equal(a.quantized_scalers, b.quantized_scalers), path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, path
