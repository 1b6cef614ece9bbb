"""Run by tests/test_fsdp.py: compression under FSDP2, as Lightning users shard.

    python fsdp_run.py OUT_DIR MODE[,MODE...]

Each MODE is one fit of :class:`Sharded` (``fully_shard`` on conv, fc1, fc2 and the
module itself in ``configure_model``) under ``ModelParallelStrategy`` with 2 CPU
processes (gloo), 4 epochs of 4 steps of 8 samples per rank: the same global batches as
one process with batch 16 (the test runs that one in-process with :func:`fit`).

MODEs: ``prune``, ``prune-2:4``, ``qat``, ``kd`` (``kd-sharded-teacher``: the teacher
sharded on its own; ``kd-sharded-cache``: that teacher with a cache that rank 1 never hits,
``kd-sharded-cache-hits``: one both ranks hit from epoch 2, ``kd-sharded-uncached``: none), ``lora``, ``qlora``, ``stack``
(distillation + pruning + QAT + export), ``resume-sharded`` / ``resume-full`` (the
stack stopped after epoch 1 with Lightning's distributed or full-state checkpoint, then
resumed by a new Trainer), and the settings refused in setup (:data:`REFUSED`: their
error message is saved instead). Each rank saves what it holds to OUT_DIR/MODE/rank<r>.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_compress import (  # noqa: E402
    CompressedExport,
    KnowledgeDistillation,
    LoRA,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.core.sharding import gathered, is_shard  # noqa: E402
from lightning_compress.quant.nf4 import is_nf4, nf4_sharding_issue  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402
from tests.ddp_process import arm_hang_report, close_process_group  # noqa: E402
from tests.scripts.ddp_distill import WideTeacher  # noqa: E402
from tests.scripts.ddp_stack import EPOCHS, QAT_START, Data, Student  # noqa: E402


class Sharded(Student):
    """The student, sharded the way Lightning's FSDP2 examples do: layers, then the root.
    conv is left to the root's group, whose parameters FSDP2 keeps gathered after a
    forward without backward (the validation loop that runs in every fit here)."""

    def configure_model(self):
        if self.device_mesh is None:  # one process: nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.fc1, self.fc2):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class BuiltInConfigureModel(Sharded):
    """Builds fc1 in ``configure_model`` and shards it there: too late for LoRA."""

    def __init__(self):
        super().__init__()
        del self.fc1

    def configure_model(self):
        if not hasattr(self, "fc1"):
            self.fc1 = torch.nn.Linear(64, 32)
        super().configure_model()


class Record(Callback):
    """What the test compares: the full weights and every compression callback's state,
    just before fake quantization starts and at the end of fit (after the export)."""

    def __init__(self, compression):
        self.compression = compression
        self.before_qat = self.state = None
        self.teacher_sharded = None
        self.teacher_forwards = []

    def snapshot(self, trainer, pl_module):
        with gathered(pl_module):  # every rank: the shards are gathered
            weights = {k: v if is_nf4(v) else v.detach().clone() for k, v in pl_module.state_dict().items()}
        return {
            "weights": weights,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.compression},
            "sharded": sorted(n for n, p in pl_module.named_parameters() if is_shard(p)),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        kd = next((cb for cb in self.compression if isinstance(cb, KnowledgeDistillation)), None)
        if kd is not None and self.teacher_sharded is None:
            self.teacher_sharded = any(is_shard(p) for p in kd.teacher.parameters())
            kd.teacher.register_forward_hook(lambda *_: self.teacher_forwards.append(1))
        if trainer.global_step == QAT_START and self.before_qat is None:
            self.before_qat = self.snapshot(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        pl_module.state_dict()  # FSDP2's own (sharded) state dict works after the export, on every rank
        kd = next((cb for cb in self.compression if isinstance(cb, KnowledgeDistillation)), None)
        cached = len(kd.output_cache) if kd is not None and kd.output_cache is not None else None
        self.state = {"rank": trainer.global_rank, "world_size": trainer.world_size, "cached_samples": cached,
                      "teacher_forwards": len(self.teacher_forwards),
                      "teacher_sharded": self.teacher_sharded, "before_qat": self.before_qat,
                      **self.snapshot(trainer, pl_module)}


class StopAfterFirstEpochs(Callback):
    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def sample_ids(batch):
    """Sample indices, from the values (the batch holds none)."""
    return (batch[0][:, 0, 0] * 2**20).round().long()


def ids_missing_on_rank_one(batch):
    """:func:`sample_ids`; on rank 1 new ones at every call, so rank 1 never finds a batch in
    its cache while rank 0 does from epoch 2 on."""
    ids = sample_ids(batch)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
        ids_missing_on_rank_one.calls = getattr(ids_missing_on_rank_one, "calls", 0) + 1
        ids = ids + ids_missing_on_rank_one.calls * 2**40
    return ids


def build(mode, out_dir):
    """The compression callbacks of ``mode`` (fresh, seeded the same in every process)."""
    torch.manual_seed(1)
    if mode.startswith("prune"):
        nm = mode == "prune-2:4"
        score = "wanda" if mode == "prune-wanda" else "magnitude"  # wanda: norms of the inputs each rank saw
        return [MagnitudePruning(None if nm else 0.6, pattern="2:4" if nm else "unstructured", score=score,
                                 scope="layer" if nm else "global", start_step=2, end_step=QAT_START, update_every=2)]
    if mode == "qat-gptq":  # rewrites whole weights at its start: refused under FSDP2
        return [QuantizationAwareTraining("int4", group_size=4, init="gptq", targets=["fc1", "fc2"],
                                          start_step=QAT_START, calibration_batches=2)]
    if mode == "qat":
        # Asymmetric: see tests/scripts/ddp_stack.py (symmetric groups sit on rounding ties).
        return [QuantizationAwareTraining("int4", group_size=4, symmetric=False, learn_ranges=True, ewgs_delta=0.2,
                                          activations="int8_static", start_step=QAT_START, calibration_steps=4)]
    if mode in ("kd", "kd-sharded-teacher"):
        strategy = "fsdp2" if mode == "kd-sharded-teacher" else "replicate"
        return [KnowledgeDistillation(WideTeacher(), features=[("fc1", "fc1")], projection_lr=1e-2,
                                      teacher_strategy=strategy)]
    if mode in ("kd-sharded-cache", "kd-sharded-cache-hits", "kd-sharded-uncached"):
        ids = ids_missing_on_rank_one if mode == "kd-sharded-cache" else sample_ids
        cache = dict(cache="memory", index_fn=ids) if mode != "kd-sharded-uncached" else {}
        return [KnowledgeDistillation(WideTeacher(), teacher_strategy="fsdp2", **cache)]
    if mode == "lora":
        return [LoRA(r=4, target_modules=["conv", "fc1", "fc2"])]
    if mode in ("qlora", "qlora-unshardable"):
        # fc2 holds 8 x 32 weights: one scaler block of 32 x 8 cannot be cut in two.
        scaler_block = 4 if mode == "qlora" else 8
        return [LoRA(r=4, target_modules=["fc1", "fc2"], base="nf4", nf4_block_size=32,
                     nf4_scaler_block_size=scaler_block)]
    if mode == "export-onnx":  # the ONNX exporter copies the model, whose FSDP2 state holds the process group
        return [QuantizationAwareTraining("int8"),
                CompressedExport(Path(out_dir) / "packed", formats=["safetensors", "onnx"])]
    if mode == "kd-self-layer-sharded":
        return [KnowledgeDistillation("self", student_layer="fc2", teacher_strategy="fsdp2")]
    if mode in ("lora-late", "lora-late-partial"):  # fc1 is built in configure_model
        # By type, fc2 is targeted in setup: LoRA adapts it before `fully_shard` and finds fc1 after.
        return [LoRA(r=4, target_modules=["fc1"] if mode == "lora-late" else [torch.nn.Linear])]
    stack = [
        KnowledgeDistillation(WideTeacher(), features=[("fc1", "fc1")], projection_lr=1e-2),
        MagnitudePruning(0.6, start_step=2, end_step=QAT_START, update_every=2),
        QuantizationAwareTraining("int4", group_size=4, symmetric=False, learn_ranges=True,
                                  activations="int8_static", start_step=QAT_START, calibration_steps=4,
                                  overrides={"fc2": {"bits": 8}}),
    ]
    return stack + [CompressedExport(Path(out_dir) / "packed", min_sqnr_db=20.0)] if mode == "stack" else stack


def fit(mode, out_dir, devices, *, ckpt_path=None, stop_at=None, distributed_checkpoint=True):
    """Train ``mode`` with ``devices`` processes (global batch 16); returns this process's
    :class:`Record` state."""
    torch.manual_seed(0)
    model = BuiltInConfigureModel() if mode.startswith("lora-late") else Sharded()
    compression = build(mode, out_dir)
    # Lightning re-seeds distributed processes from this seed when it sets them up (LoRA
    # draws its adapters after that): one process starts its fit from the same RNG state.
    pl.seed_everything(0, verbose=False)
    record = Record(compression)
    options = {}
    if devices == 2:
        options = {"devices": 2, "strategy": ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed_checkpoint)}
    extra = [StopAfterFirstEpochs(stop_at)] if stop_at else []
    trainer = make_trainer(max_epochs=EPOCHS, callbacks=[*compression, record, *extra],
                           use_distributed_sampler=False, **options)
    trainer.fit(model, datamodule=Data(), ckpt_path=ckpt_path)
    return record.state


def run(mode, out_dir):
    out_dir.mkdir(exist_ok=True)
    if mode.startswith("resume"):  # stop after epoch 1, then resume in a new Trainer
        distributed = mode in ("resume-sharded", "resume-qlora-sharded")
        method = "qlora" if "qlora" in mode else "resumed"  # (the stack without an export)
        checkpoint = out_dir / ("stopped.ckpt" if not distributed else "stopped")
        fit(method, out_dir, 2, stop_at=checkpoint, distributed_checkpoint=distributed)
        return fit(method, out_dir, 2, ckpt_path=checkpoint, distributed_checkpoint=distributed)
    if mode in REFUSED:
        try:
            fit(mode, out_dir, 2)
        except ValueError as error:  # raised the same way on both ranks, in setup
            return {"rank": torch.distributed.get_rank(), "error": str(error)}
        raise AssertionError(f"{mode} trained")
    return fit(mode, out_dir, 2)


REFUSED = ("qlora-unshardable", "lora-late", "lora-late-partial", "kd-self-layer-sharded", "qat-gptq",
           "export-onnx")  # settings that must be refused before training
# QLoRA is refused too where this torch and torchao cannot all-gather NF4 (the floor
# versions of `make test-min`: torch 2.13 with torchao 0.13).
NF4_UNSHARDABLE = nf4_sharding_issue() is not None
if NF4_UNSHARDABLE:
    REFUSED += ("qlora",)

if __name__ == "__main__":
    arm_hang_report()
    root = Path(sys.argv[1])
    for name in sys.argv[2].split(","):
        state = run(name, root / name)
        torch.save(state, root / name / f"rank{state['rank']}.pt")
    close_process_group()
