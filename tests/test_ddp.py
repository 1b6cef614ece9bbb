"""Real DDP: 2 CPU processes (gloo) launched by Lightning from a script."""

from pathlib import Path

import pytest
import torch

from lightning_compress.quant.nf4 import is_nf4
from tests.ddp_process import run_script

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


def run_ddp(out_dir: Path, *args: str) -> list:
    run_script(SCRIPT, out_dir, *args)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_same_weights(rank0, rank1):
    for key in rank0["weights"]:
        assert torch.equal(rank0["weights"][key], rank1["weights"][key]), key


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruning_ranks_hold_identical_masks_and_weights(tmp_path, pattern):
    rank0, rank1 = run_ddp(tmp_path, "prune", pattern)
    assert rank0["world_size"] == rank1["world_size"] == 2
    masks0, masks1 = rank0["callback"]["masks"], rank1["callback"]["masks"]
    assert masks0.keys() == masks1.keys() == {"conv", "fc1", "fc2"}
    for name in masks0:
        assert torch.equal(masks0[name]["packed"], masks1[name]["packed"]), name
    assert_same_weights(rank0, rank1)
    expected = 0.7 if pattern == "unstructured" else 0.5
    assert rank0["sparsity"] == pytest.approx(expected, abs=1e-3)


def test_pruning_masks_come_from_rank_zero_even_when_weights_differ(tmp_path):
    rank0, rank1 = run_ddp(tmp_path, "prune-perturbed")
    assert not torch.equal(rank0["weights"]["fc1.weight"], rank1["weights"]["fc1.weight"])  # perturbation held
    for name in rank0["callback"]["masks"]:
        assert torch.equal(rank0["callback"]["masks"][name]["packed"], rank1["callback"]["masks"][name]["packed"]), name


def test_wanda_ranks_with_the_statistics_of_both_ranks(tmp_path):
    from lightning_compress.sparsity.masks import unpack_mask

    rank0, rank1 = run_ddp(tmp_path, "prune-wanda")
    local = [torch.load(tmp_path / f"wanda_rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.allclose(local[0]["sums"]["conv"], local[1]["sums"]["conv"])  # different data per rank
    masks0, masks1 = rank0["callback"]["masks"], rank1["callback"]["masks"]
    for name in masks0:
        assert torch.equal(masks0[name]["packed"], masks1[name]["packed"]), name

    def global_keeps(sums):
        """Keep-masks of |W|·‖X‖ (the weights at the update) at 50% over all layers, by sorting."""
        weights = local[0]["weights"]
        scores = {n: weights[n].double().abs() * (s.view(1, -1, 1) if weights[n].dim() == 3 else s).sqrt()
                  for n, s in sums.items()}
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.sort(flat).indices[: round(0.5 * flat.numel())]] = False
        sizes = [s.numel() for s in scores.values()]
        return {n: k.view_as(scores[n]) for n, k in zip(scores, keep.split(sizes))}

    both = global_keeps({n: local[0]["sums"][n] + local[1]["sums"][n] for n in local[0]["sums"]})
    for name, keep in both.items():
        assert torch.equal(local[0]["weights"][name], local[1]["weights"][name]), name
        assert torch.equal(unpack_mask(masks0[name]["packed"], keep.shape), keep), name
    rank0_alone = global_keeps(local[0]["sums"])  # what rank 0's statistics alone would keep
    assert any(not torch.equal(keep, both[n]) for n, keep in rank0_alone.items())


def test_qat_observer_ranges_are_all_reduced_and_learned_scales_agree(tmp_path):
    rank0, rank1 = run_ddp(tmp_path, "qat")
    # The ranks saw different shards of the data...
    assert rank0["input_range"] != rank1["input_range"]
    layers0, layers1 = rank0["callback"]["layers"], rank1["callback"]["layers"]
    for name in layers0:
        for key in ("low", "high"):
            assert torch.equal(layers0[name]["observer"][key], layers1[name]["observer"][key]), (name, key)
        assert torch.equal(layers0[name]["log_scale"], layers1[name]["log_scale"]), name
    # ...and the first layer's observed range is the range over both shards (min-max).
    low = min(rank0["input_range"][0], rank1["input_range"][0])
    high = max(rank0["input_range"][1], rank1["input_range"][1])
    assert layers0["conv"]["observer"]["low"].item() == pytest.approx(low)
    assert layers0["conv"]["observer"]["high"].item() == pytest.approx(high)
    assert_same_weights(rank0, rank1)


def test_ewgs_scales_each_ranks_gradient_before_ddp_averages_them(tmp_path):
    """EWGS acts in the backward, on each rank's batch, as on each micro-batch under
    gradient accumulation (README): DDP's first step equals one process accumulating rank
    0's batch, then rank 1's, not one process on both batches at once."""
    import lightning.pytorch as pl
    from lightning.pytorch import Callback

    from lightning_compress import QuantizationAwareTraining
    from lightning_compress.core.transforms import raw_weight
    from tests.conftest import TinyRegressor, make_trainer

    run_ddp(tmp_path, "qat-ewgs")
    ddp = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(2)]

    class FirstGradients(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                self.grads = {n: raw_weight(pl_module.get_submodule(n)).grad.clone() for n in ("conv", "fc1", "fc2")}

    def first_gradients(batch_size, accumulate):
        pl.seed_everything(0, verbose=False)  # as the script seeds: the same initial weights
        model, record = TinyRegressor(), FirstGradients()
        assert all(torch.equal(value, ddp[0]["weights"][key]) for key, value in model.state_dict().items())
        x, y = (torch.cat([ddp[0]["batch"][i], ddp[1]["batch"][i]]) for i in (0, 1))  # each rank's first batch
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        make_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[
            QuantizationAwareTraining("int4", group_size=4, ewgs_delta=0.5, start_step=0), record]).fit(model, loader)
        return record.grads

    per_rank = len(ddp[0]["batch"][0])
    accumulated, global_batch = first_gradients(per_rank, 2), first_gradients(2 * per_rank, 1)
    for name in ("conv", "fc1", "fc2"):
        assert torch.equal(ddp[0]["grads"][name], ddp[1]["grads"][name]), name
        torch.testing.assert_close(ddp[0]["grads"][name], accumulated[name], rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.allclose(ddp[0]["grads"][name], global_batch[name], rtol=1e-3, atol=0), name


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_lora_adapters_and_bases_are_identical_on_both_ranks(tmp_path, mode):
    rank0, rank1 = run_ddp(tmp_path, mode)
    assert rank0["world_size"] == 2
    adapters = [k for k in rank0["weights"] if ".lora_" in k]
    assert len(adapters) == (6 if mode == "lora" else 4)
    for key in adapters:  # trained, and kept in step by DDP
        assert torch.count_nonzero(rank0["weights"][key]).item() > 0, key
    for key, value in rank0["weights"].items():
        other = rank1["weights"][key]
        if is_nf4(value):  # the frozen base: quantized from rank 0's weights on both ranks
            assert torch.equal(value.quantized_data, other.quantized_data), key
            assert torch.equal(value.quantized_scalers, other.quantized_scalers), key
        else:
            assert torch.equal(value, other), key
    # Dropout masks differ per rank (own generator, seeded per rank).
    assert rank0["callback"]["dropout"]["seed"] != rank1["callback"]["dropout"]["seed"]


def test_export_is_written_once_by_rank_zero(tmp_path):
    from lightning_compress import load_packed
    from tests.conftest import FAST_INT8, TinyRegressor

    rank0, rank1 = run_ddp(tmp_path, "export")
    assert_same_weights(rank0, rank1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["packed"]  # no temporary left
    loaded = load_packed(tmp_path / "packed", TinyRegressor())
    assert loaded.packed_kernels == {"conv": "dequantize", "fc1": FAST_INT8, "fc2": FAST_INT8}


def test_failed_export_fails_every_rank_without_hanging(tmp_path):
    result = run_script(SCRIPT, tmp_path, "export-fail", check=False)
    assert result.returncode != 0
    assert "ParityError" in result.stdout + result.stderr
    assert not (tmp_path / "packed").exists()
    assert (tmp_path / "packed.failed-parity" / "parity.json").is_file()  # the trained model, kept by rank 0


def test_a_dry_export_failure_stops_every_rank_before_training(tmp_path):
    result = run_script(SCRIPT, tmp_path, "export-dry-fail", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "dry export (before the first training step) failed on rank 0" in output and "NaN value" in output
    assert not any(tmp_path.glob("packed*")) and not any(tmp_path.glob("rank*.pt"))  # fit never ended


def test_a_layer_silent_on_one_rank_stops_both_ranks_with_its_name(tmp_path):
    """fc2 records calibration inputs on rank 0 only: rank 1 alone would refuse while
    rank 0 waited in the Hessian all-reduce. Both ranks refuse, naming fc2."""
    result = run_script(SCRIPT, tmp_path, "qat-calibrated-silent", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("['fc2'] received no input in the 2 calibration batch(es) on at least one of the 2 processes") == 2
    assert "Timeout" not in output and "Connection closed" not in output
    assert not any(tmp_path.glob("rank*.pt"))  # fit never ended


def test_calibrated_start_uses_the_statistics_of_both_ranks(tmp_path):
    """GPTQ + SmoothQuant: the maxima are maxed and the Hessians summed over the ranks, so
    both ranks start from the GPTQ rounding of the smoothed weight under both ranks' data."""
    from lightning_compress.quant.gptq import gptq_quantize
    from lightning_compress.quant.smoothing import smoothquant_scales
    from lightning_compress.quant.spec import QuantSpec

    rank0, rank1 = run_ddp(tmp_path, "qat-calibrated")
    assert_same_weights(rank0, rank1)
    local = [torch.load(tmp_path / f"calibration_rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(local[0]["inputs"]) == len(local[1]["inputs"]) == 2
    assert torch.equal(local[0]["before"], local[1]["before"])
    peaks = [torch.cat(r["inputs"]).abs().amax(dim=0) for r in local]
    assert not torch.equal(peaks[0], peaks[1])  # different data per rank
    before = local[0]["before"]
    scales = smoothquant_scales(torch.maximum(*peaks), before.abs().amax(dim=0), 0.5)
    hessian = 0
    for rank in local:  # each rank sums x^T x per batch, scales it, then the ranks' sums are added
        own = 0
        for x in rank["inputs"]:
            own = own + x.T @ x
        hessian = hessian + own / (scales[:, None] * scales[None, :])
    expected, _, _ = gptq_quantize(before * scales, hessian, QuantSpec(4, "group", 8))
    for rank in local:
        assert torch.equal(rank["effective"], expected)
