"""Real DDP: 2 CPU processes (gloo) launched by Lightning from a script."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"


def run_ddp_script(name: str, out_dir: Path, *args: str) -> list:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), str(out_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SCRIPTS.parents[1],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ddp_ranks_hold_identical_masks_and_weights(tmp_path, pattern):
    rank0, rank1 = run_ddp_script("ddp_pruning.py", tmp_path, pattern)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["masks"].keys() == rank1["masks"].keys() == {"conv", "fc1", "fc2"}
    for name in rank0["masks"]:
        assert torch.equal(rank0["masks"][name]["packed"], rank1["masks"][name]["packed"]), name
    for key in rank0["weights"]:
        assert torch.equal(rank0["weights"][key], rank1["weights"][key]), key
    expected = 0.7 if pattern == "unstructured" else 0.5
    assert rank0["sparsity"] == pytest.approx(expected, abs=1e-3)
