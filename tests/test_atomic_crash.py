"""SIGKILL at every step of a directory write (invariant 5): the target is then the complete
old directory or the complete new one, it loads, and the next write leaves no temporaries.

Each writer runs in a child forked from this process (no second import of torch) that
sets ``atomic.on_stage`` to kill itself with SIGKILL when the write reaches a stage
(``atomic.STAGES``: before the swap, half of a file written, built, between the two
renames, after the swap, after the old one is deleted). Both ways of swapping run: one
``renameat2(RENAME_EXCHANGE)``, and the two renames of file systems that cannot exchange
(the only one with an instant where the target is missing, recovered by the next load or
write). Writers: ``export`` (packed directory, with ONNX once) and ``save_adapters``.
"""

import os
import signal
import tempfile
import time
import traceback

import pytest
import torch
from torch import nn

from lightning_compress import ExportError, LoRAConfig, export, load_adapters, load_packed, save_adapters
from lightning_compress.core import atomic
from lightning_compress.core.atomic import STAGES, recover_directory, write_lock
from lightning_compress.formats.packed import WEIGHTS_FILE
from lightning_compress.lora import inject_adapters
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import round_to_nearest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the writer")

CASES = [(swap, stage) for swap in ("exchange", "two renames") for stage in STAGES
         if not (swap == "exchange" and stage == "aside")]  # one exchange: no instant in between
BEFORE_SWAP = ("locked", "building", "built", "aside")
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def killed_at(stage, swap, write):
    """Run ``write()`` in a forked child that gets SIGKILL when a directory write reaches
    ``stage``; fails unless it died that way."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)  # no OpenMP pool inherited across fork
            if swap == "two renames":
                atomic.exchange = lambda first, second: False
            atomic.on_stage = lambda reached: os.kill(os.getpid(), signal.SIGKILL) if reached == stage else None
            write()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(17)
    deadline = time.monotonic() + 120
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the writer hung before {stage!r}")
        time.sleep(0.01)
    status = done[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"the writer ended without reaching {stage!r} (status {status}); its traceback is in the captured stderr"


# ---- packed exports ---------------------------------------------------------------------------


def plain():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def quantized(version):
    torch.manual_seed(version)
    model = plain()
    round_to_nearest(model, QuantSpec(8))
    return model


@pytest.fixture(scope="module")
def packed_weights(tmp_path_factory):
    """``model.safetensors`` of each version, exported once (the bytes depend only on the
    weights): which version a directory holds."""
    folder = tmp_path_factory.mktemp("reference")
    for version in (1, 2, 3):
        export(quantized(version), folder / str(version))
    return {version: (folder / str(version) / WEIGHTS_FILE).read_bytes() for version in (1, 2, 3)}


def assert_packed(target, version, packed_weights):
    """``target`` loads (every checksum verified) and is export ``version``, whole."""
    load_packed(target, plain, backend="dequantize")
    assert (target / WEIGHTS_FILE).read_bytes() == packed_weights[version]


@pytest.mark.parametrize("swap, stage", CASES)
def test_killed_export_leaves_old_or_new_directory(tmp_path, swap, stage, packed_weights):
    target = tmp_path / "out"
    export(quantized(1), target)
    killed_at(stage, swap, lambda: export(quantized(2), target, overwrite=True, inputs=[X]))
    assert target.exists() == (stage != "aside")  # only between the two renames is it missing
    assert_packed(target, 1 if stage in BEFORE_SWAP else 2, packed_weights)  # the load puts the old one back
    export(quantized(3), target, overwrite=True)
    assert listing(tmp_path) == ["out"]
    assert_packed(target, 3, packed_weights)


def test_export_killed_between_the_renames_is_recovered_by_the_next_export(tmp_path, packed_weights, system_temp):
    target = tmp_path / "out"
    export(quantized(1), target)
    killed_at("aside", "two renames", lambda: export(quantized(2), target, overwrite=True))
    assert not target.exists()
    with pytest.raises(ExportError, match="overwrite=True") as caught:  # the old one is back: not replaced
        export(quantized(3), target)
    assert listing(tmp_path) == ["out"]
    assert_packed(target, 1, packed_weights)
    assert_packed(caught.value.directory, 3, packed_weights)  # the refused export is kept in the temporary directory


def test_killed_export_with_onnx_keeps_the_old_onnx(tmp_path, packed_weights):
    import onnxruntime  # noqa: F401  (a dev dependency: a missing one fails, never skips)
    target = tmp_path / "out"
    export(quantized(1), target, inputs=[X], formats=["safetensors", "onnx"])
    old = (target / "model.onnx").read_bytes()
    killed_at("aside", "two renames",
              lambda: export(quantized(2), target, overwrite=True, inputs=[X], formats=["safetensors", "onnx"]))
    assert recover_directory(target) is True
    assert (target / "model.onnx").read_bytes() == old
    assert_packed(target, 1, packed_weights)
    export(quantized(3), target, overwrite=True, inputs=[X], formats=["safetensors", "onnx"])
    assert listing(tmp_path) == ["out"] and (target / "model.onnx").read_bytes() != old


@pytest.fixture
def system_temp(tmp_path, monkeypatch):
    """The system's temporary directory (where an export that cannot write its directory
    goes instead), moved into ``tmp_path``."""
    folder = tmp_path.parent / f"{tmp_path.name}-system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_second_concurrent_export_fails_cleanly(tmp_path, packed_weights, system_temp):
    target = tmp_path / "out"
    export(quantized(1), target)
    with write_lock(target):  # what a first export holds while it works
        with pytest.raises(ExportError, match=rf"being written by process {os.getpid()}, which holds .*\.out\.lock"
                                              r".*export is complete and checked in .*out instead") as caught:
            export(quantized(2), target, overwrite=True)
    assert listing(tmp_path) == ["out"]
    assert_packed(target, 1, packed_weights)
    assert_packed(caught.value.directory, 2, packed_weights)  # the second one is not lost
    assert caught.value.directory.parent.parent == system_temp


@pytest.mark.parametrize("empty", [True, False])
def test_export_without_overwrite_never_replaces_a_directory_appearing_meanwhile(tmp_path, monkeypatch, empty,
                                                                                  system_temp, packed_weights):
    target = tmp_path / "out"

    def appear(reached):
        if reached == "built" and not target.exists():
            target.mkdir()
            if not empty:
                (target / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(atomic, "on_stage", appear)
    with pytest.raises(ExportError, match="appeared while it was being written") as caught:
        export(quantized(1), target)
    assert listing(target) == ([] if empty else ["theirs.txt"])
    assert listing(tmp_path) == ["out"]
    assert_packed(caught.value.directory, 1, packed_weights)  # kept in the temporary directory


# ---- PEFT adapters ----------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def adapted(version):
    """Version ``version``: its own adapter weights and its own ``lora_alpha`` (a new
    weight file beside an old config would load with the wrong scaling)."""
    config = LoRAConfig(r=2, lora_alpha=2 * version, target_modules=["fc", "head"])
    model = Tiny()
    inject_adapters(model, config)
    torch.manual_seed(version)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter))
    return model, config


def save(version, target):
    model, config = adapted(version)
    save_adapters(model, target, config)


def assert_adapters(target, version):
    model, config = adapted(version)
    fresh = Tiny()
    loaded = load_adapters(fresh, target)
    assert loaded.lora_alpha == config.lora_alpha
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("swap, stage", CASES)
def test_killed_adapter_save_leaves_old_or_new_adapters(tmp_path, swap, stage):
    target = tmp_path / "adapter"
    save(1, target)
    (target / "README.md").write_text("kept")  # not ours: survives every save
    killed_at(stage, swap, lambda: save(2, target))
    assert recover_directory(target) == (stage == "aside")  # what a loader does first
    assert_adapters(target, 1 if stage in BEFORE_SWAP else 2)
    save(3, target)
    assert listing(tmp_path) == ["adapter"]
    assert listing(target) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (target / "README.md").read_text() == "kept"
    assert_adapters(target, 3)


def test_adapters_recovered_after_a_kill_load_in_peft(tmp_path):
    import peft
    target = tmp_path / "adapter"
    save(1, target)
    killed_at("aside", "two renames", lambda: save(2, target))
    save(3, target)  # recovers, then replaces
    assert listing(tmp_path) == ["adapter"]
    model, _ = adapted(3)
    theirs = peft.PeftModel.from_pretrained(Tiny(), str(target)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), model(X), rtol=1e-5, atol=1e-6)
