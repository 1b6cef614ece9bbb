"""LoRA / QLoRA: numerics, the callback under a real Trainer, stacking, resume, bad input."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn

from lightning_compress import LoRA, LoRAConfig, MagnitudePruning, QuantizationAwareTraining, merge_adapters, quantized_weights
from lightning_compress.core.transforms import raw_weight
from lightning_compress.lora import inject_adapters
from lightning_compress.quant.nf4 import dequantize_nf4, is_nf4, weight_nbytes
from tests.conftest import TinyRegressor, fit_interrupted_and_resumed, make_trainer, tiny_loader

# TinyRegressor's fc1 (32x64) and fc2 (8x32) split into NF4 blocks of 32 and scale blocks of 8.
TINY_NF4 = dict(base="nf4", nf4_block_size=32, nf4_scaler_block_size=8)


class Mixed(nn.Module):
    """Embedding -> Conv1d -> Linear -> head: every layer type LoRA adapts."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.fc(h)))


def _perturb_adapters(model, scale=0.1):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * scale)


# ------------------------------------------------------------------ numerics
def test_fresh_adapters_leave_outputs_unchanged_and_freeze_the_rest(seeded):
    model = Mixed()
    ids = torch.randint(0, 20, (4, 10))
    reference = model(ids)
    inject_adapters(model, LoRAConfig(r=4, target_modules=["emb", "conv", "fc"], modules_to_save=["head"]))
    assert torch.equal(model(ids), reference)  # B = 0
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        [f"{layer}.lora_{ab}" for layer in ("emb", "conv", "fc") for ab in "AB"] + ["head.weight", "head.bias"]
    )
    assert model.fc.lora_A.shape == (4, 16) and model.fc.lora_B.shape == (16, 4)
    assert model.conv.lora_A.shape == (4, 16, 3) and model.conv.lora_B.shape == (16, 4, 1)
    assert model.emb.lora_A.shape == (4, 20) and model.emb.lora_B.shape == (16, 4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_adapter_matches_the_lora_formula(seeded, use_rslora):
    layer = nn.Linear(12, 6)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    inject_adapters(layer, LoRAConfig(r=3, lora_alpha=5, use_rslora=use_rslora), {"": layer})
    _perturb_adapters(layer, 1.0)
    scaling = 5 / (math.sqrt(3) if use_rslora else 3)
    x = torch.randn(7, 12)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ weight.t() + bias + scaling * (x @ a.t() @ b.t())
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    # Code that reads `layer.weight` (nn.MultiheadAttention, tied weights) sees the merged weight.
    torch.testing.assert_close(layer.weight, weight + scaling * (b @ a), rtol=1e-6, atol=1e-6)


def test_merged_model_matches_unmerged_and_has_the_users_keys(seeded):
    model = Mixed()
    keys = list(model.state_dict())
    inject_adapters(model, LoRAConfig(r=4, target_modules=["emb", "conv", "fc"]))
    _perturb_adapters(model)
    ids = torch.randint(0, 20, (8, 10))
    unmerged = model(ids)
    assert merge_adapters(model) == ["emb", "conv", "fc"]
    merged = model(ids)
    assert ((merged - unmerged).norm() / unmerged.norm()).item() <= 1e-5
    assert list(model.state_dict()) == keys
    assert type(model.fc) is nn.Linear  # the user's own class back
    with pytest.raises(ValueError, match="already merged .*merge once"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_adapters(Mixed())


def test_dropout_acts_on_the_adapter_input_only_in_training(seeded):
    layer = nn.Linear(16, 16)
    inject_adapters(layer, LoRAConfig(r=4, lora_dropout=0.5), {"": layer})
    _perturb_adapters(layer, 1.0)
    x = torch.randn(64, 16)
    base = F.linear(x, raw_weight(layer), layer.bias)
    layer.train()
    first, second = layer(x) - base, layer(x) - base
    assert not torch.allclose(first, second)  # fresh masks each call
    layer.eval()
    expected = x @ layer.lora_A.t() @ layer.lora_B.t() * (16 / 4)
    torch.testing.assert_close(layer(x) - base, expected, rtol=1e-5, atol=1e-5)


def test_qlora_forward_and_gradients_match_a_dequantized_reference(seeded):
    layer = nn.Linear(128, 128)
    original = layer.weight.detach().clone()
    inject_adapters(layer, LoRAConfig(r=8, base="nf4"), {"": layer})
    weight = raw_weight(layer)
    assert is_nf4(weight) and not weight.requires_grad
    dense = dequantize_nf4(weight)
    # NF4 with double-quantized scales: close to the original, 4-bit codes + int8 scales.
    assert (dense - original).abs().max() < 0.25 * original.abs().max()
    assert weight.quantized_scalers.dtype == torch.int8 and weight.quantized_data.dtype == torch.uint8
    assert weight_nbytes(weight) / (original.numel() * 4) < 0.14
    _perturb_adapters(layer)

    x = torch.randn(5, 128, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ref_a = layer.lora_A.detach().clone().requires_grad_()
    ref_b = layer.lora_B.detach().clone().requires_grad_()
    expected = F.linear(ref_x, dense, layer.bias) + (ref_x @ ref_a.t() @ ref_b.t()) * 2.0
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.lora_A.grad, ref_a.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad, ref_b.grad, rtol=1e-5, atol=1e-4)


def test_qlora_compute_dtype_runs_the_layer_in_bfloat16(seeded):
    layer = nn.Linear(256, 64)
    inject_adapters(layer, LoRAConfig(r=4, base="nf4", compute_dtype="bfloat16"), {"": layer})
    _perturb_adapters(layer)
    x = torch.randn(3, 256)
    out = layer(x)
    assert out.dtype == torch.float32  # returned in the input's dtype
    xb = x.bfloat16()
    expected = F.linear(xb, dequantize_nf4(raw_weight(layer), torch.bfloat16)) + layer.bias.bfloat16()
    expected = expected + F.linear(F.linear(xb, layer.lora_A.bfloat16()), layer.lora_B.bfloat16()) * 4.0
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=0)


# ------------------------------------------------------------------ the callback
def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_adapters_and_modules_to_save_train(seeded):
    model = TinyRegressor()
    before = _state(model)
    lora = LoRA(r=4, target_modules=["conv", "fc1"], modules_to_save=["fc2"])
    trainer = make_trainer(max_epochs=2, callbacks=[lora])
    trainer.fit(model, tiny_loader())
    after = model.state_dict()
    changed = sorted(k for k in after if k not in before or not torch.equal(after[k], before[k]))
    assert changed == ["conv.lora_A", "conv.lora_B", "fc1.lora_A", "fc1.lora_B", "fc2.bias", "fc2.weight"]
    # The optimizer holds only what trains.
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    trainable = 4 * 12 + 8 * 4 + 4 * 64 + 32 * 4 + 8 * 32 + 8
    total = sum(p.numel() for p in model.parameters())
    metrics = trainer.callback_metrics
    assert metrics["lora/trainable_params"].item() == trainable
    assert metrics["lora/trainable_share"].item() == pytest.approx(trainable / total)
    frozen = (8 * 4 * 3 + 8 + 32 * 64 + 32) * 4
    assert metrics["lora/base_weight_bytes"].item() == frozen


def test_merge_on_fit_end_gives_the_trained_function_in_the_users_classes(seeded):
    model = TinyRegressor()
    lora = LoRA(r=4, target_modules=["conv", "fc1", "fc2"])
    make_trainer(max_epochs=2, callbacks=[lora]).fit(model, tiny_loader())
    x = tiny_loader().dataset.tensors[0]
    unmerged = model(x)
    lora.merge()
    merged = model(x)
    assert ((merged - unmerged).norm() / unmerged.norm()).item() <= 1e-5
    assert sorted(model.state_dict()) == sorted(TinyRegressor().state_dict())
    TinyRegressor().load_state_dict(model.state_dict())  # strict: no lightning-compress needed
    with pytest.raises(ValueError, match="already merged .*merge once"):
        lora.merge()


def test_qlora_trains_through_the_trainer_and_merges_in_float32(seeded):
    model = TinyRegressor()
    lora = LoRA(r=4, target_modules=["fc1", "fc2"], merge_on_fit_end=True, **TINY_NF4)
    x = tiny_loader().dataset.tensors[0]
    probe = {}

    class Probe(Callback):
        def on_fit_end(self, trainer, pl_module):
            probe["out"] = pl_module(x)  # listed first: runs before LoRA merges

    make_trainer(max_epochs=2, callbacks=[Probe(), lora]).fit(model, tiny_loader())
    assert model.fc1.weight.dtype == torch.float32 and not is_nf4(model.fc1.weight)
    assert ((model(x) - probe["out"]).norm() / probe["out"].norm()).item() <= 1e-5


class BuiltInConfigureModel(TinyRegressor):
    """Builds its layers in configure_model, as Lightning recommends for large models."""

    def __init__(self):
        super().__init__()
        del self.fc1, self.fc2

    def configure_model(self):
        if not hasattr(self, "fc1"):
            self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 8)


def test_layers_built_in_configure_model_are_adapted_before_the_optimizer(seeded):
    model = BuiltInConfigureModel()
    trainer = make_trainer(max_epochs=1, callbacks=[LoRA(r=2, target_modules=["fc1", "fc2"])])
    trainer.fit(model, tiny_loader())
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(model.fc1.lora_A), id(model.fc1.lora_B), id(model.fc2.lora_A), id(model.fc2.lora_B)}
    assert "configure_model" not in vars(model)


# ------------------------------------------------------------------ stacking
def _stack(order):
    callbacks = {
        "lora": LoRA(r=4, target_modules=["fc1", "fc2"], merge_on_fit_end=True),
        "prune": MagnitudePruning(0.5, start_step=2, end_step=10, update_every=2, targets=["fc1", "fc2"]),
        "qat": QuantizationAwareTraining("int4", group_size=8, start_step=4, targets=["fc1", "fc2"]),
    }
    return [callbacks[name] for name in order]


def _fit_stack(order):
    torch.manual_seed(0)
    model = TinyRegressor()
    callbacks = _stack(order)
    torch.manual_seed(1)  # adapters' initialisation draws from here, whatever the order
    make_trainer(max_epochs=2, callbacks=callbacks).fit(model, tiny_loader())
    return model, callbacks


def test_lora_pruning_and_qat_stack_in_any_order_and_pruned_weights_stay_zero():
    results = [_fit_stack(order) for order in itertools.permutations(["lora", "prune", "qat"])]
    reference, callbacks = results[0]
    prune = callbacks[1]
    for name in ("fc1", "fc2"):
        weight = raw_weight(reference.get_submodule(name))  # the merged weight
        zeros = (weight == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=0.01), name
        # The export's codes: pruned weights are exactly zero after the merge and fake-quant.
        codes = quantized_weights(reference)[name]
        assert torch.all(codes.dequantize()[weight == 0] == 0)
    assert prune.sparsity == pytest.approx(0.5, abs=0.01)
    for model, _ in results[1:]:
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_unmerged_adapters_keep_the_pruning_mask_after_fit(seeded):
    model = TinyRegressor()
    prune = MagnitudePruning(0.5, start_step=0, end_step=4, update_every=1, targets=["fc1"])
    make_trainer(max_epochs=1, callbacks=[prune, LoRA(r=4, target_modules=["fc1"])]).fit(model, tiny_loader())
    # W + B·A is not zero where W is; the mask stays on the layer so the effective weight is.
    assert (model.fc1.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_evaluations_after_fit_keep_the_mask_of_an_adapted_layer(seeded):
    # A new user's trial: the second `validate` after fit installed fresh (empty) masks on
    # the LoRA layers, so it and every later test/predict measured a dense W + B·A.
    model = TinyRegressor()
    prune = MagnitudePruning(0.5, start_step=0, end_step=4, update_every=1, targets=["fc1"])
    trainer = make_trainer(max_epochs=1, callbacks=[prune, LoRA(r=4, target_modules=["fc1"])])
    trainer.fit(model, tiny_loader())
    pruned = model.fc1.weight.detach().clone()
    assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    losses = [trainer.validate(model, tiny_loader(), verbose=False)[0]["val/loss"] for _ in range(3)]
    assert torch.equal(model.fc1.weight, pruned) and len(set(losses)) == 1


def test_dropout_with_a_stage_on_the_same_weight_is_refused(seeded):
    callbacks = [LoRA(r=4, lora_dropout=0.1, target_modules=["fc1"]), QuantizationAwareTraining("int8", targets=["fc1"])]
    with pytest.raises(ValueError, match=r"`lora_dropout`=0.1 acts on the adapter's input.*'fc1'"):
        make_trainer(callbacks=callbacks).fit(TinyRegressor(), tiny_loader())


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize(
    "options",
    [dict(lora_dropout=0.2), dict(lora_dropout=0.2, adapter_only_checkpoints=True), dict(TINY_NF4, target_modules=["fc1", "fc2"])],
    ids=["full", "adapter_only", "qlora"],
)
def test_resume_is_bit_identical(tmp_path, options):
    options = {"r": 4, "target_modules": ["conv", "fc1", "fc2"], **options}
    reference, _, resumed, _, checkpoint = fit_interrupted_and_resumed(
        lambda: LoRA(**options), tmp_path, epochs=3, stop_after=0
    )
    for key, value in reference.state_dict().items():
        if is_nf4(value):
            assert torch.equal(dequantize_nf4(value), dequantize_nf4(resumed.state_dict()[key])), key
        else:
            assert torch.equal(resumed.state_dict()[key], value), key
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    if options.get("adapter_only_checkpoints"):
        assert sorted(saved) == ["conv.lora_A", "conv.lora_B", "fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]


def test_adapter_only_resume_onto_another_base_is_refused(tmp_path):
    def make():
        return LoRA(r=4, target_modules=["fc1"], adapter_only_checkpoints=True)

    _, _, _, _, checkpoint = fit_interrupted_and_resumed(make, tmp_path, epochs=1, stop_after=0)
    other = TinyRegressor()  # another random base
    with pytest.raises(ValueError, match="frozen base weights of this model differ from those the adapters"):
        make_trainer(max_epochs=2, callbacks=[make()]).fit(other, tiny_loader(), ckpt_path=checkpoint)


def test_resume_with_another_rank_is_refused(tmp_path):
    _, _, _, _, checkpoint = fit_interrupted_and_resumed(
        lambda: LoRA(r=4, target_modules=["fc1"]), tmp_path, epochs=1, stop_after=0
    )
    with pytest.raises(ValueError, match="adapters have r=4 but this callback has r=2; resume with the same `r`"):
        make_trainer(max_epochs=2, callbacks=[LoRA(r=2, target_modules=["fc1"])]).fit(
            TinyRegressor(), tiny_loader(), ckpt_path=checkpoint
        )


def test_resume_with_other_modules_to_save_or_from_another_model_is_refused(tmp_path):
    """Without `modules_to_save` the optimizer's state did not fit (torch's raw "parameter
    group that doesn't match" error); a checkpoint whose adapters sit on layers this model
    has none of was told to change `target_modules` (a new user's trial)."""
    _, _, _, _, checkpoint = fit_interrupted_and_resumed(
        lambda: LoRA(r=4, target_modules=["fc1"], modules_to_save=["fc2"]), tmp_path, epochs=1, stop_after=0
    )
    with pytest.raises(ValueError, match=r"other settings \(`modules_to_save`: \['fc2'\] in the checkpoint, None now\)"):
        make_trainer(max_epochs=2, callbacks=[LoRA(r=4, target_modules=["fc1"])]).fit(
            TinyRegressor(), tiny_loader(), ckpt_path=checkpoint)

    class Renamed(TinyRegressor):  # another model: its layers have other names
        def __init__(self):
            super().__init__()
            self.first, self.second = self.fc1, self.fc2
            del self.fc1, self.fc2

        def forward(self, x):
            return self.second(torch.relu(self.first(torch.relu(self.conv(x)).flatten(1))))

    with pytest.raises(ValueError, match=r"adapters sit on \['fc1'\]\.\.\., none of which this model has: the"
                                         r" checkpoint is from another model"):
        make_trainer(max_epochs=2, callbacks=[LoRA(r=4, target_modules=["first"], modules_to_save=["second"])]).fit(
            Renamed(), tiny_loader(), ckpt_path=checkpoint)


def test_test_from_a_checkpoint_in_a_fresh_model_reproduces_the_trained_outputs(seeded, tmp_path):
    model = TinyRegressor()
    trainer = make_trainer(max_epochs=1, callbacks=[LoRA(r=4, target_modules=["fc1"])])
    trainer.fit(model, tiny_loader())
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    x = tiny_loader().dataset.tensors[0]
    expected = model(x)
    fresh = TinyRegressor()
    make_trainer(callbacks=[LoRA(r=4, target_modules=["fc1"])]).validate(fresh, tiny_loader(), ckpt_path=tmp_path / "done.ckpt")
    assert torch.equal(fresh(x), expected)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), r"`r` \(the adapter rank\) must be a positive int, got 0"),
        (dict(r=-2), r"`r` .* got -2"),
        (dict(r=2.5), r"`r` .* got 2.5"),
        (dict(lora_alpha=0), "`lora_alpha` must be a positive number"),
        (dict(lora_dropout=1.0), r"`lora_dropout` must be a number in \[0, 1\)"),
        (dict(use_rslora="yes"), "`use_rslora` must be True or False"),
        (dict(base="int4"), "unknown `base` 'int4'; choose 'float' or 'nf4'"),
        (dict(compute_dtype="bfloat16"), "`compute_dtype` .* needs base='nf4'"),
        (dict(base="nf4", compute_dtype="int8"), "unknown `compute_dtype` 'int8'"),
        (dict(nf4_block_size=63), "`nf4_block_size` must be an even int"),
        (dict(target_modules=[""]), "`target_modules` has an empty name pattern"),
        (dict(target_modules=[nn.LayerNorm]), "`target_modules` names the layer type LayerNorm"),
        (dict(modules_to_save="  "), "`modules_to_save` must be a list of module names"),
        (dict(merge_on_fit_end="yes"), "`merge_on_fit_end` must be True or False"),
        (dict(adapter_only_checkpoints=1), "`adapter_only_checkpoints` must be True or False"),
        (dict(adapter_dir=3), "`adapter_dir` must be a directory path"),
        (dict(peft_root=""), "`peft_root` must be a submodule name"),
        (dict(name=""), "`name` must be a non-empty string"),
    ],
)
def test_bad_arguments_fail_when_the_callback_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRA(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=["fc_1"]), r"`target_modules` pattern 'fc_1' matches no module. Close names: fc1, fc2"),
        (dict(target_modules=["fc1"], modules_to_save=["haed"]), r"`modules_to_save` pattern 'haed' matches no module"),
        (dict(target_modules=["fc1"], modules_to_save=["fc1"]),
         "'fc1' is both adapted and in `modules_to_save`: `target_modules` selects it and `modules_to_save` holds it"),
        # A type is an explicit target too: only the default targets leave modules_to_save out.
        (dict(target_modules=[nn.Linear], modules_to_save=["fc2"]),
         "'fc2' is both adapted and in `modules_to_save`: `target_modules` selects it and `modules_to_save` holds it"),
        (dict(modules_to_save=["fc1", "fc2"]),
         r"every layer LoRA adapts by default \(each Linear and attention layer\) lies in `modules_to_save` \['fc1', 'fc2'\].*name the"
         " layers to adapt in `target_modules`"),
        (dict(target_modules=["conv"], base="nf4"), "'conv' is a Conv1d; base='nf4' .* Linear and attention layers only"),
        (dict(target_modules=["fc1"], base="nf4", nf4_block_size=96), r"'fc1': `nf4_block_size`=96 does not divide its 2048 weights"),
        # The first line named nf4_block_size, whose blocks fit (a new user's trial).
        (dict(target_modules=["fc2"], base="nf4"), r"^LoRA\(nf4_scaler_block_size=256\) cannot adapt layer 'fc2' .*'fc2':"
                                                   r" its 4 NF4 blocks do not split into `nf4_scaler_block_size`=256"),
    ],
)
def test_bad_targets_fail_before_training_and_leave_the_model_unchanged(kwargs, message):
    model = TinyRegressor()
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        make_trainer(callbacks=[LoRA(**kwargs)]).fit(model, tiny_loader())
    assert list(model.state_dict()) == list(before)
    assert all(p.requires_grad for p in model.parameters())


def _body_and_head():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("head", nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    return model


def test_default_targets_leave_out_modules_to_save_and_what_they_hold(seeded):
    model = _body_and_head()
    adapters = inject_adapters(model, LoRAConfig(r=2, modules_to_save=["head"]))
    assert list(adapters) == ["body"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["body.lora_A", "body.lora_B", "head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight"]
    with pytest.raises(ValueError, match=r"layer 'head.0' is both adapted and in `modules_to_save`: `target_modules`"
                                         r" selects it and `modules_to_save` holds 'head', which contains it"):
        inject_adapters(_body_and_head(), LoRAConfig(r=2, target_modules=[nn.Linear], modules_to_save=["head"]))


def test_grouped_convolution_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped convolution"):
        inject_adapters(model, LoRAConfig(target_modules=[nn.Conv2d]))


def test_merge_before_setup_is_refused():
    with pytest.raises(ValueError, match="no adapters to merge yet"):
        LoRA().merge()
