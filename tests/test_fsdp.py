"""FSDP2: every callback, alone and stacked, under Lightning's ModelParallelStrategy with
``fully_shard`` in ``configure_model`` (2 gloo CPU processes, tests/scripts/fsdp_run.py),
trains what one process with the same global batch trains, resumes bit for bit from
both of Lightning's checkpoint kinds, and exports what the unsharded run exports."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_compress import load_packed
from lightning_compress.quant.nf4 import is_nf4
from lightning_compress.sparsity.masks import unpack_mask
from tests.ddp_process import assert_same, run_script
from tests.scripts import fsdp_run

ALONE = ("prune", "prune-2:4", "prune-wanda", "qat", "kd", "lora", *(() if fsdp_run.NF4_UNSHARDABLE else ("qlora",)))
MODES = (*ALONE, "kd-sharded-teacher", "kd-sharded-cache", "kd-sharded-cache-hits", "kd-sharded-uncached", "stack", "resume-sharded", "resume-full",
         *(() if fsdp_run.NF4_UNSHARDABLE else ("resume-qlora-sharded",)), *fsdp_run.REFUSED)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """``{mode: (rank 0 state, rank 1 state)}``: every mode in one pair of processes."""
    root = tmp_path_factory.mktemp("fsdp")
    # 16 runs in one pair of processes: 50 s on an idle machine, several times that beside
    # another worker's DDP test on 2 cores (a CI run passed the 300 s default's hang report).
    run_script(fsdp_run.__file__, root, ",".join(MODES), cwd=tmp_path_factory.getbasetemp(), timeout_s=900)
    return root, {mode: [torch.load(root / mode / f"rank{r}.pt", weights_only=True) for r in range(2)]
                  for mode in MODES}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same runs in this process: one device, batch 16, nothing sharded."""
    root = tmp_path_factory.mktemp("single")
    return root, {mode: fsdp_run.fit(mode, root / mode, 1) for mode in (*ALONE, "stack")}


def _relative_error(actual, expected):
    if is_nf4(expected):
        return 0.0 if torch.equal(actual.quantized_data, expected.quantized_data) \
            and torch.equal(actual.quantized_scalers, expected.quantized_scalers) else float("inf")
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("mode", ALONE)
def test_each_callback_under_fsdp2_trains_what_one_process_trains(sharded, single, mode):
    _, runs = sharded
    rank0, rank1 = runs[mode]
    alone = single[1][mode]
    assert rank0["world_size"] == 2 and alone["world_size"] == 1
    # The layers really were sharded (adapters too: LoRA adds them before `fully_shard`)...
    assert {"fc1.weight", "fc2.weight"} <= set(rank0["sharded"]) and not alone["sharded"]
    if mode.endswith("lora"):
        assert {"fc1.lora_A", "fc1.lora_B"} <= set(rank0["sharded"])
    # ...both ranks hold the same full weights and compression state, bit for bit...
    assert_same(rank0["weights"], rank1["weights"], "weights")
    callbacks = [copy.deepcopy(rank["callbacks"]) for rank in (rank0, rank1)]  # the fixture's own stay whole
    if mode.endswith("lora"):  # each rank draws its own dropout masks
        seeds = [states["LoRA"]["dropout"].pop("seed") for states in callbacks]
        assert seeds[1] == seeds[0] + 1
    assert_same(*callbacks, "callbacks")
    # ...and they are what one process trains, up to the order of float sums (the gradient
    # of the global batch is reduced over two ranks). Before fake quantization starts for
    # QAT, and at the end for the others; see test_the_stack for QAT's end state.
    end = rank0["before_qat"]["weights"] if mode == "qat" else rank0["weights"]
    expected = alone["before_qat"]["weights"] if mode == "qat" else alone["weights"]
    assert end.keys() == expected.keys()
    for key, value in expected.items():
        assert _relative_error(end[key], value) <= 1e-5, key
    if mode.startswith("prune"):  # masks from one global ranking over the full tensors
        masks = alone["callbacks"]["MagnitudePruning"]["masks"]
        assert masks.keys() == {"conv", "fc1", "fc2"}
        for name, entry in masks.items():
            assert torch.equal(rank0["callbacks"]["MagnitudePruning"]["masks"][name]["packed"], entry["packed"]), name
        assert rank0["callbacks"]["MagnitudePruning"]["actual_sparsity"] == pytest.approx(
            0.5 if mode == "prune-2:4" else 0.6, abs=0.01)
    if mode == "kd":  # the feature projection trains outside FSDP, replicated on both ranks
        for key, value in alone["callbacks"]["KnowledgeDistillation"]["projections"]["0"].items():
            mine = rank0["callbacks"]["KnowledgeDistillation"]["projections"]["0"][key]
            assert _relative_error(mine, value) <= 1e-5, key


def test_the_stack_under_fsdp2_matches_one_process_and_exports_the_same_codes(sharded, single):
    root, runs = sharded
    rank0, rank1 = runs["stack"]
    single_root, singles = single
    alone = singles["stack"]
    assert rank0["teacher_sharded"] is False and alone["teacher_sharded"] is False  # never sharded with the student
    assert_same(rank0["weights"], rank1["weights"], "weights")
    assert_same(rank0["callbacks"], rank1["callbacks"], "callbacks")
    before, alone_before = rank0["before_qat"], alone["before_qat"]
    for key, value in alone_before["weights"].items():
        assert _relative_error(before["weights"][key], value) <= 1e-5, key
    for name, entry in alone["callbacks"]["MagnitudePruning"]["masks"].items():
        assert torch.equal(rank0["callbacks"]["MagnitudePruning"]["masks"][name]["packed"], entry["packed"]), name
        # The zeros are in the shards (conv sits in the root's group, which FSDP2 keeps
        # gathered after each validation loop), so the weights handed back are sparse.
        pruned = ~unpack_mask(entry["packed"], entry["shape"])
        assert bool((rank0["weights"][f"{name}.weight"][pruned] == 0).all()), name
    # After fake quantization starts a last-bit difference can move a value across a
    # rounding boundary (measured: 2e-4 of a weight's range at most, as under DDP); a
    # rank-local range or mask is off by 1e-2 and more.
    for key, value in alone["weights"].items():
        assert _relative_error(rank0["weights"][key], value) <= 1e-3, key
    # The export (rank 0, from the gathered weights) packs the codes one process packs.
    packed, reference = root / "stack" / "packed", single_root / "stack" / "packed"
    assert json.loads((packed / "compression.json").read_text())["parity"]["passed"]
    ours, theirs = load_file(packed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if value.is_floating_point():  # scales, biases: the trained floats
            assert _relative_error(ours[key], value) <= 1e-3, key
        else:  # codes, bitmasks, zero points
            assert torch.equal(ours[key], value), key
    x = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = load_packed(packed, fsdp_run.Sharded())(x)
        expected = load_packed(reference, fsdp_run.Sharded())(x)
    assert _relative_error(out, expected) <= 1e-3


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_resume_under_fsdp2_is_bit_exact(sharded, kind):
    root, runs = sharded
    resumed, unstopped = runs[f"resume-{kind}"][0], runs["stack"][0]
    stopped = root / f"resume-{kind}" / ("stopped" if kind == "sharded" else "stopped.ckpt")
    assert stopped.is_dir() == (kind == "sharded")  # Lightning's distributed checkpoint is a directory
    assert_same(resumed["weights"], unstopped["weights"], "weights")
    for method in ("KnowledgeDistillation", "MagnitudePruning", "QuantizationAwareTraining"):
        assert_same(resumed["callbacks"][method], unstopped["callbacks"][method], method)


@pytest.mark.skipif(fsdp_run.NF4_UNSHARDABLE, reason="QLoRA is refused under FSDP2 with this torch and torchao")
def test_qlora_resumes_from_a_distributed_checkpoint_bit_for_bit(sharded):
    """The checkpoint left the NF4 bases out, to be put back from the module before loading,
    which torch.distributed.checkpoint does first: "Missing key in checkpoint state_dict"."""
    root, runs = sharded
    assert (root / "resume-qlora-sharded" / "stopped").is_dir()
    resumed, unstopped = runs["resume-qlora-sharded"][0], runs["qlora"][0]
    assert_same(resumed["weights"], unstopped["weights"], "weights")
    assert_same(resumed["callbacks"]["LoRA"], unstopped["callbacks"]["LoRA"], "LoRA")


def test_a_teacher_sharded_on_its_own_teaches_what_a_replicated_one_does(sharded, single):
    _, runs = sharded
    rank0, rank1 = runs["kd-sharded-teacher"]
    assert rank0["teacher_sharded"] is True and runs["kd"][0]["teacher_sharded"] is False
    assert not any(name.startswith("teacher") for name in rank0["sharded"])  # not sharded with the student
    assert_same(rank0["weights"], rank1["weights"], "weights")
    alone = single[1]["kd"]
    for key, value in alone["weights"].items():
        assert _relative_error(rank0["weights"][key], value) <= 1e-5, key
    for key, value in alone["callbacks"]["KnowledgeDistillation"]["projections"]["0"].items():
        mine = rank0["callbacks"]["KnowledgeDistillation"]["projections"]["0"][key]
        assert _relative_error(mine, value) <= 1e-5, key


def test_a_sharded_teacher_with_a_cache_one_rank_never_hits_teaches_what_it_does_uncached(sharded):
    # Rank 0 finds its batches cached from epoch 2 on, rank 1 never does; the sharded
    # teacher's forward is a collective, so it runs on both ranks whenever rank 1 needs it
    # (rank 0 skipping it left rank 1 waiting in its all-gather forever).
    _, runs = sharded
    cached, hits, uncached = runs["kd-sharded-cache"], runs["kd-sharded-cache-hits"], runs["kd-sharded-uncached"]
    assert cached[0]["teacher_sharded"] is True
    assert [rank["cached_samples"] for rank in cached] == [32, 4 * 32]  # 4 epochs of 32 samples per rank
    assert [rank["teacher_forwards"] for rank in cached] == [16, 16]  # every step, on both ranks
    # Where both ranks hit from epoch 2, the sharded teacher runs in epoch 1 and for the check
    # of epoch 2's first batch only, on both.
    assert [rank["teacher_forwards"] for rank in hits] == [4 + 1, 4 + 1]
    for rank in range(2):
        assert_same(cached[rank]["weights"], uncached[rank]["weights"], "weights")
        assert_same(hits[rank]["weights"], uncached[rank]["weights"], "weights")


def test_settings_fsdp2_cannot_shard_are_refused_before_training(sharded):
    _, runs = sharded
    for rank in runs["qlora-unshardable"]:
        if fsdp_run.NF4_UNSHARDABLE:  # refused before the block check (the floor versions' torchao)
            assert "_wrap_tensor_autograd" in rank["error"]
        else:
            assert "['fc2'] cannot be cut into" in rank["error"] and "nf4_scaler_block_size" in rank["error"]
    for rank in runs["lora-late"]:
        assert "['fc1'] are sharded already" in rank["error"] and "__init__" in rank["error"]
    for rank in runs["lora-late-partial"]:  # fc2 adapted in setup, fc1 built after it
        assert "before `configure_model` built ['fc1']" in rank["error"] and "`exclude_modules`" in rank["error"]
    for rank in runs["kd-self-layer-sharded"]:
        assert "runs one submodule of it; use teacher_strategy='replicate'" in rank["error"]
    for rank in runs["qlora"] if fsdp_run.NF4_UNSHARDABLE else []:  # the floor versions' torchao
        assert "_wrap_tensor_autograd" in rank["error"] and "upgrade torchao" in rank["error"]
    for rank in runs["qat-gptq"]:
        assert "init='gptq' is not supported under FSDP2" in rank["error"] and "train with DDP" in rank["error"]
    for rank in runs["export-onnx"]:  # refused before training, not by a pickling error in the dry export
        assert "formats=[..., 'onnx'] cannot trace a model sharded by ModelParallelStrategy" in rank["error"]
        assert "save_distributed_checkpoint=False" in rank["error"] and "--format onnx" in rank["error"]


def test_export_is_written_once(sharded):
    root, _ = sharded
    assert sorted(p.name for p in (root / "stack").iterdir()) == ["packed", "rank0.pt", "rank1.pt"]
    assert not list(Path(root).glob("**/*.failed-parity"))
