"""Run by tests/test_ddp.py under strategy="ddp" with 2 CPU processes (gloo).

    python ddp_run.py OUT_DIR prune PATTERN   # MagnitudePruning
    python ddp_run.py OUT_DIR prune-perturbed # rank 1's weights differ at the first update
    python ddp_run.py OUT_DIR prune-wanda     # score="wanda"; the ranks see different data
    python ddp_run.py OUT_DIR qat             # QAT: learned scales + static observers
    python ddp_run.py OUT_DIR qat-calibrated  # QAT init="gptq" + smoothing; ranks see different data
    python ddp_run.py OUT_DIR qat-ewgs        # QAT ewgs_delta: the first step's reduced gradients
    python ddp_run.py OUT_DIR qat-calibrated-silent  # ... fc2's forward not called as a module on rank 1
    python ddp_run.py OUT_DIR lora            # LoRA with dropout on conv, fc1, fc2
    python ddp_run.py OUT_DIR qlora           # QLoRA; rank 1's base differs before setup
    python ddp_run.py OUT_DIR export          # QAT int8 + CompressedExport (rank 0 writes)
    python ddp_run.py OUT_DIR export-fail     # ... whose final parity check fails
    python ddp_run.py OUT_DIR export-dry-fail # ... of a model the dry export refuses

Lightning's launcher re-runs this script for rank 1. Each rank saves what it holds to
OUT_DIR/rank<r>.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from lightning_compress.quant.nf4 import is_nf4  # noqa: E402
from lightning_compress import CompressedExport, LoRA, MagnitudePruning, QuantizationAwareTraining  # noqa: E402
from tests.conftest import TinyRegressor, make_trainer, tiny_loader  # noqa: E402
from tests.ddp_process import arm_hang_report, close_process_group  # noqa: E402


class PerturbRankOne(Callback):
    """Makes rank 1's fc1 weights differ from rank 0's just before the first mask update,
    so masks computed locally would differ: only the broadcast can make them agree."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2 and trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.fc1.weight.add_(torch.randn_like(pl_module.fc1.weight))


class PerturbBaseOnRankOne(Callback):
    """Before LoRA's setup, makes rank 1's fc1 weights differ, so rank 1 quantizes another
    NF4 base: DDP's broadcast of the module state from rank 0 (which covers NF4 tensors)
    must make the frozen bases agree."""

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.fc1.weight.add_(1.0)


class RecordFirstGradients(Callback):
    """The latent weights' gradients of the first optimizer step, after DDP averaged them."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.batch = [t.clone() for t in batch]
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            from lightning_compress.core.transforms import raw_weight

            grads = {name: raw_weight(pl_module.get_submodule(name)).grad.clone() for name in ("conv", "fc1", "fc2")}
            torch.save({"grads": grads, "batch": self.batch, "weights": self.weights},
                       self.out_dir / f"grads{trainer.global_rank}.pt")


class SaveRankState(Callback):
    """Saves the callback state and weights at the end of fit, and the range of the raw
    inputs this rank saw while the observers calibrated."""

    def __init__(self, compression, out_dir):
        self.compression, self.out_dir = compression, Path(out_dir)
        self.input_low, self.input_high = float("inf"), float("-inf")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step < 8:
            self.input_low = min(self.input_low, batch[0].min().item())
            self.input_high = max(self.input_high, batch[0].max().item())

    def on_fit_end(self, trainer, pl_module):
        state = {
            "callback": self.compression.state_dict(),
            # NF4's clone() re-quantizes with default blocks: keep the tensor itself.
            "weights": {k: v if is_nf4(v) else v.clone() for k, v in pl_module.state_dict().items()},
            "world_size": trainer.world_size,
            "input_range": (self.input_low, self.input_high),
        }
        if isinstance(self.compression, MagnitudePruning):
            state["sparsity"] = self.compression.sparsity
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


class RecordWanda(Callback):
    """For "prune-wanda": this rank's own sums of squares of each layer's inputs over the
    training batches before the update at step 3, and the weights that update ranks
    (listed before the pruning callback), saved to OUT_DIR/wanda_rank<r>.pt."""

    def __init__(self, out_dir):
        self.out_dir, self.sums, self.weights, self.collecting = Path(out_dir), {}, {}, False

    def on_train_start(self, trainer, pl_module):
        for name in ("conv", "fc1", "fc2"):
            layer = pl_module.get_submodule(name)
            layer.register_forward_hook(lambda m, args, out, name=name: self._add(name, m, args[0]))

    def _add(self, name, layer, x):
        if self.collecting:
            dims = (0, 2) if isinstance(layer, torch.nn.Conv1d) else (0,)
            self.sums[name] = self.sums.get(name, 0) + x.detach().double().pow(2).sum(dim=dims)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.collecting = trainer.global_step < 3

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.collecting = False
        if trainer.global_step == 3:
            self.weights = {n: pl_module.get_submodule(n).weight.detach().clone() for n in self.sums}

    def on_fit_end(self, trainer, pl_module):
        torch.save({"sums": self.sums, "weights": self.weights}, self.out_dir / f"wanda_rank{trainer.global_rank}.pt")


class RecordCalibration(Callback):
    """For "qat-calibrated": this rank's own fc2 inputs over the calibration steps 0 and 1,
    fc2's raw weight just before the start (step 2's batch start) and its effective weight
    in step 2's forward, saved to OUT_DIR/calibration_rank<r>.pt."""

    def __init__(self, out_dir):
        self.out_dir, self.inputs, self.record = Path(out_dir), [], False

    def on_train_start(self, trainer, pl_module):
        pl_module.fc2.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach().clone())
                                                if self.record else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record = trainer.global_step < 2
        if trainer.global_step == 2 and not hasattr(self, "before"):
            self.before = pl_module.fc2._parameters["weight"].detach().clone()

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == 2 and not hasattr(self, "effective"):
            self.effective = pl_module.fc2.weight.detach().clone()

    def on_fit_end(self, trainer, pl_module):
        torch.save({"inputs": self.inputs, "before": self.before, "effective": self.effective},
                   self.out_dir / f"calibration_rank{trainer.global_rank}.pt")


class FunctionalFc2OnRankOne(TinyRegressor):
    """On rank 1, fc2 is applied through its parameters (``F.linear``), not called as a
    module: that rank's calibration hooks record no input for it, rank 0's do."""

    def forward(self, x):
        if self.trainer.global_rank == 0:
            return super().forward(x)
        h = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        return torch.nn.functional.linear(h, self.fc2.weight, self.fc2.bias)


def build(mode: str, pattern: str):
    if mode.startswith("qat-calibrated"):  # relu(x / s) == relu(x) / s, so fc1 -> fc2 is a valid mapping
        return QuantizationAwareTraining("int4", group_size=8, init="gptq", activations="int8_dynamic", smoothing=0.5,
                                         mappings={"fc1": ["fc2"]}, targets=["fc2"], calibration_batches=2,
                                         start_step=2)
    if mode == "qat-ewgs":
        return QuantizationAwareTraining("int4", group_size=4, ewgs_delta=0.5, start_step=0)
    if mode == "prune-wanda":
        return MagnitudePruning(0.5, schedule="one_shot", start_step=3, scope="global", score="wanda")
    if mode == "lora":
        return LoRA(r=4, target_modules=["conv", "fc1", "fc2"], lora_dropout=0.3)
    if mode == "qlora":
        return LoRA(r=4, target_modules=["fc1", "fc2"], base="nf4", nf4_block_size=32, nf4_scaler_block_size=8)
    if mode.startswith("export"):
        return QuantizationAwareTraining("int8", activations="int8_dynamic")
    if mode.startswith("prune"):
        n_m = ":" in pattern
        return MagnitudePruning(
            None if n_m else 0.7,
            pattern=pattern,
            start_step=2,
            end_step=8,
            update_every=2,
            scope="layer" if n_m else "global",
        )
    return QuantizationAwareTraining(
        "int4", group_size=4, learn_ranges=True, activations="int8_static", start_step=0, calibration_steps=8
    )


if __name__ == "__main__":
    arm_hang_report()
    out_dir, mode = sys.argv[1], sys.argv[2]
    pattern = sys.argv[3] if len(sys.argv) > 3 else "unstructured"
    pl.seed_everything(0, verbose=False)
    compression = build(mode, pattern)
    exporting = []
    if mode == "export-fail":
        from lightning_compress.formats import int8_gemm

        if int8_gemm.int8_gemm_available() is not None:  # not exact on this CPU: run it anyway (tests/conftest.py)
            int8_gemm.int8_gemm_available = lambda: None
    if mode.startswith("export"):
        # "export-fail": a parity threshold no int8 GEMM meets, so rank 0's export fails.
        failing = mode == "export-fail"
        exporting = [CompressedExport(Path(out_dir) / "packed", backend="fbgemm" if failing else "auto",
                                      min_sqnr_db=200 if failing else 0)]
    trainer = make_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=3,
        callbacks=([PerturbRankOne()] if mode == "prune-perturbed" else [])
        + ([RecordWanda(out_dir)] if mode == "prune-wanda" else [])
        + ([RecordCalibration(out_dir)] if mode == "qat-calibrated" else [])
        + ([PerturbBaseOnRankOne()] if mode == "qlora" else [])
        + ([RecordFirstGradients(out_dir)] if mode == "qat-ewgs" else [])
        + [compression, SaveRankState(compression, out_dir)] + exporting,
    )
    model = FunctionalFc2OnRankOne() if mode == "qat-calibrated-silent" else TinyRegressor()
    if mode == "export-dry-fail":  # a buffer holding NaN (a diverged running statistic): the export refuses it
        model.register_buffer("running_stat", torch.tensor([1.0, float("nan"), 2.0]))
    loader = tiny_loader(batches=8)
    if mode in ("prune-wanda", "qat-calibrated"):  # rank 1 (odd samples, DistributedSampler) sees a 50x larger input channel 2
        loader.dataset.tensors[0][1::2, 2] *= 50.0
    trainer.fit(model, loader)
    close_process_group()
