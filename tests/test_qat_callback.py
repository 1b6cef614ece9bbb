"""QuantizationAwareTraining under a real Lightning Trainer on CPU."""

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_compress import MagnitudePruning, QuantizationAwareTraining, quantized_weights
from lightning_compress.core.transforms import Stage, get_weight_transform, raw_weight
from lightning_compress._torchao import import_torchao
from lightning_compress.quant.fake_quant import as_matrix
from lightning_compress.quant.spec import QuantSpec
from tests.conftest import TinyRegressor, fit_interrupted_and_resumed, make_trainer, tiny_loader

LAYERS = ("conv", "fc1", "fc2")
torchao_qat = import_torchao("torchao.quantization.qat")


# Oracles independent of the package's own choose_qparams / fake_quantize.
def torchao_fake_quant(matrix, bits, group_size=None):
    """torchao's IntxFakeQuantizer, symmetric, per group of ``group_size`` or per channel."""
    dtype = torch.int8 if bits == 8 else getattr(torch, f"int{bits}")
    if group_size:
        config = torchao_qat.IntxFakeQuantizeConfig(dtype, group_size=group_size)
    else:
        config = torchao_qat.IntxFakeQuantizeConfig(dtype, "per_channel")
    return torchao_qat.IntxFakeQuantizer(config)(matrix)


def int4_scales(matrix, group, clip=None):
    """Symmetric int4 scales written out: max|w| of each group of ``group`` (times its clip
    ratio) over (qmax - qmin) / 2 = 7.5, at least float32's smallest normal."""
    reach = matrix.reshape(-1, group).abs().amax(1)
    if clip is not None:
        reach = reach * clip
    return torch.clamp(reach / 7.5, min=torch.finfo(torch.float32).smallest_normal)


def int4_mse_clip(matrix, group):
    """Per group, the first of the ratios 1.0, 0.95, ..., 0.5 whose clipped int4 grid
    gives the least squared error, searched here one ratio at a time."""
    groups = matrix.reshape(-1, group)
    best_error, best_ratio = None, None
    for i in range(11):
        ratio = torch.full((groups.shape[0],), 1.0 - 0.05 * i)
        scale = int4_scales(matrix, group, ratio).view(-1, 1)
        approx = torch.clamp(torch.round(groups * (1.0 / scale)), -8, 7) * scale
        error = (approx - groups).square().sum(1)
        if best_error is None:
            best_error, best_ratio = error, ratio
        else:
            better = error < best_error
            best_error, best_ratio = torch.where(better, error, best_error), torch.where(better, ratio, best_ratio)
    return best_ratio


class EffectiveWeights(Callback):
    """After each batch: whether each layer computed with its raw float weight."""

    def __init__(self):
        self.float_steps, self.quantized_steps = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step whose forward just ran
        same = all(torch.equal(pl_module.get_submodule(n).weight, raw_weight(pl_module.get_submodule(n))) for n in LAYERS)
        (self.float_steps if same else self.quantized_steps).append(step)


def test_float_before_start_step_and_quantized_after(seeded):
    qat = QuantizationAwareTraining("int4", group_size=4, start_step=5)
    watcher = EffectiveWeights()
    model = TinyRegressor()
    make_trainer(max_epochs=2, callbacks=[qat, watcher]).fit(model, tiny_loader(batches=8))
    assert watcher.float_steps == [0, 1, 2, 3, 4]
    assert watcher.quantized_steps == list(range(5, 16))
    spec = QuantSpec(4, "group", 4)
    for name in LAYERS:
        layer = model.get_submodule(name)
        matrix = as_matrix(raw_weight(layer).detach())
        expected = torchao_fake_quant(matrix, 4, group_size=4).view_as(layer.weight)
        assert torch.equal(layer.weight, expected), name


class ObserverLog(Callback):
    def __init__(self, qat):
        self.qat, self.ranges = qat, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        observer = self.qat._input_quantizers["fc1"]
        if observer.low is not None:
            self.ranges.append((trainer.global_step, observer.low.item(), observer.high.item()))


def test_static_observer_freezes_at_its_step_and_validation_does_not_move_it(seeded):
    qat = QuantizationAwareTraining("int8", activations="int8_static", start_step=2, calibration_steps=3)
    log = ObserverLog(qat)
    model = TinyRegressor()
    # Training batches only up to step 2 + 3 update the range; validation data is 100x larger.
    trainer = make_trainer(max_epochs=2, callbacks=[qat, log], limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, tiny_loader(batches=8, seed=1), tiny_loader(batches=2, seed=2, scale=100.0))
    assert log.ranges[0][0] == 3  # first observed in the step-2 forward (logged after the step)
    frozen = [(lo, hi) for step, lo, hi in log.ranges if step > 5]
    assert len(set(frozen)) == 1
    calibrating = [(lo, hi) for step, lo, hi in log.ranges if step <= 5]
    assert len(set(calibrating)) > 1
    low, high = frozen[0]
    assert low == 0.0 and 0 < high < 20  # post-ReLU inputs; not the validation inputs' range
    trainer.validate(model, tiny_loader(batches=2, seed=2, scale=100.0))
    observer = qat._input_quantizers["fc1"]
    assert (observer.low.item(), observer.high.item()) == (low, high)


def _qat():
    return QuantizationAwareTraining(
        "int4", group_size=4, learn_ranges=True, activations="int8_static", start_step=4, calibration_steps=20
    )


def _quantizer_state(qat):
    state = qat.state_dict()["layers"]
    return {name: (entry["log_scale"], entry["observer"]["low"], entry["observer"]["high"]) for name, entry in state.items()}


def test_resume_mid_qat_is_bit_identical(tmp_path):
    reference, uninterrupted, resumed_model, resumed, _ = fit_interrupted_and_resumed(
        _qat, tmp_path, epochs=4, stop_after=1
    )

    for key, value in reference.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    expected, got = _quantizer_state(uninterrupted), _quantizer_state(resumed)
    for name in expected:
        for a, b in zip(expected[name], got[name]):
            assert torch.equal(a, b), name
    # The learned scales moved away from their min/max initialisation.
    fc1 = uninterrupted._weight_quantizers["fc1"]
    initial_scale = int4_scales(as_matrix(raw_weight(reference.fc1).detach()), 4)
    assert not torch.allclose(fc1.log_scale.detach().exp().cpu(), initial_scale)


def test_mse_ranges_resume_bit_identical_export_exactly_and_refuse_other_ranges(tmp_path):
    from lightning_compress import export

    def mse():
        return QuantizationAwareTraining("int4", group_size=4, weight_range="mse", start_step=4)

    reference, uninterrupted, resumed_model, resumed, checkpoint = fit_interrupted_and_resumed(
        mse, tmp_path, epochs=3, stop_after=0
    )
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    (saved,) = [state for key, state in torch.load(checkpoint, weights_only=True)["callbacks"].items()
                if key.startswith("QuantizationAwareTraining")]
    for name, quantizer in uninterrupted._weight_quantizers.items():
        # The ratios chosen at step 4 came back from the checkpoint, not from the weights of the resume.
        assert torch.equal(saved["layers"][name]["clip"], quantizer.clip.cpu()), name
        assert torch.equal(resumed._weight_quantizers[name].clip.cpu(), quantizer.clip.cpu()), name
    report = export(resumed_model, tmp_path / "packed", inputs=[torch.randn(4, 4, 8)])
    assert report.parity.weights_exact and report.parity.relative_error == 0.0

    other = QuantizationAwareTraining("int4", group_size=4, start_step=4)
    with pytest.raises(ValueError, match="was trained with weight_range='mse' but this callback uses weight_range='minmax'"):
        make_trainer(max_epochs=3, callbacks=[other]).fit(TinyRegressor(), tiny_loader(), ckpt_path=checkpoint)


@pytest.mark.parametrize("qat_first", [True, False])
def test_qat_with_pruning_in_either_order_gives_the_same_model(qat_first, seeded):
    def run(order_qat_first):
        torch.manual_seed(0)
        model = TinyRegressor()
        pruning = MagnitudePruning(0.5, start_step=2, end_step=10, update_every=2)
        qat = QuantizationAwareTraining("int4", group_size=4, learn_ranges=True, start_step=4)
        callbacks = [qat, pruning] if order_qat_first else [pruning, qat]
        make_trainer(max_epochs=2, callbacks=callbacks).fit(model, tiny_loader(batches=8))
        return model, qat

    model_a, qat_a = run(qat_first)
    model_b, qat_b = run(not qat_first)
    for key, value in model_a.state_dict().items():
        assert torch.equal(model_b.state_dict()[key], value), key
    for name in LAYERS:
        assert torch.equal(qat_a._weight_quantizers[name].log_scale, qat_b._weight_quantizers[name].log_scale)
        pruned = raw_weight(model_a.get_submodule(name)) == 0
        assert pruned.float().mean() == pytest.approx(0.5, abs=0.02)
        # Pruned weights are exactly zero in the fake-quantized weight and in the codes.
        assert bool((model_a.get_submodule(name).weight[pruned] == 0).all())
    for name, packed in quantized_weights(model_a).items():
        pruned = as_matrix(raw_weight(model_a.get_submodule(name))) == 0
        zero_points = packed.zero_point.repeat_interleave(packed.codes.shape[1] // packed.zero_point.shape[1], dim=1)
        assert torch.equal(packed.codes[pruned].long(), zero_points[pruned].long())


def test_quantized_weights_dequantize_to_the_effective_weight(seeded):
    qat = QuantizationAwareTraining(
        "int4", group_size=4, overrides={"fc2": {"bits": 8, "granularity": "channel"}}, start_step=0
    )
    model = TinyRegressor()
    make_trainer(max_epochs=1, callbacks=[qat]).fit(model, tiny_loader(batches=4))
    packed = quantized_weights(model)
    assert set(packed) == set(LAYERS)
    assert packed["fc1"].spec == QuantSpec(4, "group", 4) and packed["fc1"].scale.shape == (32, 16)
    assert packed["fc2"].spec == QuantSpec(8, "channel") and packed["fc2"].scale.shape == (8, 1)
    assert int(packed["fc1"].codes.min()) >= -8 and int(packed["fc1"].codes.max()) <= 7
    assert int(packed["fc2"].codes.abs().max()) > 7  # 8-bit layer uses the wider grid
    for name, entry in packed.items():
        assert torch.equal(entry.dequantize(), model.get_submodule(name).weight.detach()), name


class BNModel(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class RunningMean(Callback):
    def __init__(self):
        self.means = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.means[trainer.global_step] = pl_module.bn.running_mean.clone()


def test_batchnorm_statistics_freeze_after_freeze_bn_step(seeded):
    log = RunningMean()
    qat = QuantizationAwareTraining("int8", start_step=0, freeze_bn_step=4)
    make_trainer(max_epochs=2, callbacks=[qat, log]).fit(BNModel(), tiny_loader(batches=8))
    assert not torch.equal(log.means[2], log.means[4])
    for step in range(5, 17):
        assert torch.equal(log.means[step], log.means[4]), step


def test_dynamic_activation_quantization_changes_layer_inputs(seeded):
    model = TinyRegressor()
    qat = QuantizationAwareTraining("int8", activations="int8_dynamic", start_step=0)
    make_trainer(max_epochs=1, callbacks=[qat], limit_train_batches=1).fit(model, tiny_loader())
    seen = {}
    model.fc1.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    x = torch.randn(2, 4, 8)
    model(x)
    flat = torch.relu(model.conv(x)).flatten(1)
    assert not torch.equal(seen["x"], flat)
    assert torch.allclose(seen["x"], flat, atol=flat.abs().max().item() / 100)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weights="int1"), "`weights` must be 'int2'..'int8'"),
        (dict(weights=9), "`weights` must be 'int2'..'int8'"),
        (dict(granularity="row"), "unknown `granularity`"),
        (dict(granularity="channel", group_size=32), "only applies to granularity='group'"),
        (dict(activations="int4"), "unknown `activations`"),
        (dict(observer="histogram"), "unknown `observer`"),
        (dict(weight_range="percentile"), r"unknown `weight_range` 'percentile'; choose one of \('minmax', 'mse'\)"),
        (dict(calibration_steps=0), "`calibration_steps` must be a positive int"),
        (dict(start_step=-3), "`start_step` must be >= 0"),
        (dict(freeze_bn_step=2.5), "`freeze_bn_step`=2.5 is a float"),
        (dict(learn_ranges="yes"), "`learn_ranges` must be True or False"),
        (dict(overrides={"fc1": 8}), "must be a dict of options"),
        (dict(overrides={"fc1": {"bitz": 8}}), r"unknown option\(s\) \['bitz'\]"),
        (dict(overrides={"fc1": {"bits": 12}}), "`overrides\\['fc1'\\].bits` must be"),
        (dict(group_size=32, overrides={"fc1": {"group_size": None}}),
         r"`overrides\['fc1'\]`: `group_size` must be an int >= 2 for granularity='group', got None; for one scale"
         r" per output channel instead, set granularity='channel'"),
        (dict(targets=[nn.LayerNorm]), "`targets` names the layer type LayerNorm"),
        (dict(range_lr=0), "`range_lr` must be a positive number"),
        (dict(name=3), "`name` must be a non-empty string"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_group_size_that_does_not_divide_a_layer_names_it_and_offers_a_fix(seeded):
    qat = QuantizationAwareTraining("int4", group_size=32)
    with pytest.raises(ValueError, match=r"does not divide the input size 12 of layer 'conv'; use granularity='channel'"):
        make_trainer(callbacks=[qat]).fit(TinyRegressor(), tiny_loader())


def test_unsupported_layer_in_targets_and_unused_override_fail_before_training(seeded):
    model = BNModel()
    with pytest.raises(ValueError, match=r"'bn' matches only layers of unsupported types \(BatchNorm1d\)"):
        make_trainer(callbacks=[QuantizationAwareTraining(targets=["bn"])]).fit(model, tiny_loader())
    with pytest.raises(ValueError, match=r"`overrides` pattern\(s\) \['head'\] set no quantized layer's grid"):
        make_trainer(callbacks=[QuantizationAwareTraining(overrides={"head": {"bits": 8}})]).fit(
            TinyRegressor(), tiny_loader()
        )
    # A pattern that matches, but after a broader one: the first match wins, and the message says so.
    shadowed = QuantizationAwareTraining(overrides={"fc*": {"bits": 8}, "fc2": {"bits": 3}}, exclude=["conv"])
    with pytest.raises(ValueError, match=r"\['fc2'\] set no quantized layer's grid \('fc2' matches fc2, which an"
                                         r" earlier pattern \('fc\*'\) matches first: list the more specific pattern"
                                         r" first\)"):
        make_trainer(callbacks=[shadowed]).fit(TinyRegressor(), tiny_loader())


def test_round_to_nearest_quantizes_in_place_without_training(seeded):
    from lightning_compress.quant import round_to_nearest

    model = TinyRegressor()
    raw = {n: model.get_submodule(n).weight.detach().clone() for n in LAYERS}
    quantizers = round_to_nearest(model, QuantSpec(3, "channel"), exclude=["fc2"])
    assert set(quantizers) == {"conv", "fc1"}
    for name in ("conv", "fc1"):
        expected = torchao_fake_quant(as_matrix(raw[name]), 3).view_as(raw[name])
        assert torch.equal(model.get_submodule(name).weight, expected)
        assert len(torch.unique(model.get_submodule(name).weight[0])) <= 8  # 3-bit grid
    assert torch.equal(model.fc2.weight, raw["fc2"])
    assert set(quantized_weights(model)) == {"conv", "fc1"}


def test_checkpoint_loads_into_the_plain_class_and_evaluates_quantized_in_a_new_trainer(tmp_path, seeded):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = TinyRegressor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(
        max_epochs=2, callbacks=[QuantizationAwareTraining("int4", group_size=4, start_step=3), checkpoint],
        enable_checkpointing=True,
    )
    val = tiny_loader(batches=2, seed=5)
    trainer.fit(model, tiny_loader(batches=8))
    quantized_loss = trainer.validate(model, val)[0]["val/loss"]

    # The checkpoint holds the user's keys only: the plain class loads it strictly (float).
    plain = TinyRegressor.load_from_checkpoint(tmp_path / "last.ckpt", strict=True)
    float_loss = make_trainer().validate(plain, val)[0]["val/loss"]
    assert float_loss != quantized_loss

    # A new Trainer with the callback evaluates the quantized model from the checkpoint.
    fresh = make_trainer(callbacks=[QuantizationAwareTraining("int4", group_size=4, start_step=3)])
    restored_loss = fresh.validate(TinyRegressor(), val, ckpt_path=tmp_path / "last.ckpt")[0]["val/loss"]
    assert restored_loss == quantized_loss


@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
@pytest.mark.parametrize("learned", [False, True])
def test_ranges_start_from_the_weight_range_grid(seeded, weight_range, learned):
    class AtStart(Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            if trainer.global_step in (3, 5):  # the forward that switched fake quantization on, and a later one
                raw = as_matrix(raw_weight(pl_module.fc1).detach())
                self.device, weight = raw.device, raw.cpu()  # the references are computed on the CPU
                if trainer.global_step == 3:
                    self.minmax = int4_scales(weight, 4)
                    self.clip = int4_mse_clip(weight, 4)
                    self.mse_scale = int4_scales(weight, 4, self.clip)
                    self.used = quantized_weights(pl_module)["fc1"].scale.flatten().cpu()
                else:
                    self.later = weight.clone()
                    self.used_later = quantized_weights(pl_module)["fc1"].scale.flatten().cpu()

    qat = QuantizationAwareTraining("int4", group_size=4, weight_range=weight_range, learn_ranges=learned,
                                    start_step=3)
    watch = AtStart()
    make_trainer(max_epochs=1, callbacks=[qat, watch]).fit(TinyRegressor(), tiny_loader(batches=8))
    start = watch.mse_scale if weight_range == "mse" else watch.minmax
    # Learned scales compute with exp(log(scale)) (on the training device: exp differs by device).
    assert torch.equal(watch.used, start.to(watch.device).log().exp().cpu() if learned else start)
    if weight_range == "mse":
        assert bool((watch.clip <= 1).all()) and bool((watch.clip < 1).any())  # clipped, never widened
    if not learned:
        # Later steps: min/max follows the weights; "mse" keeps the ratios chosen at start.
        clip = watch.clip if weight_range == "mse" else None
        assert torch.equal(watch.used_later, int4_scales(watch.later, 4, clip))
        assert (qat._weight_quantizers["fc1"].clip is None) == (weight_range == "minmax")


def test_learned_ranges_fine_tune_a_float_checkpoint_with_an_lr_scheduler(tmp_path, seeded):
    class Scheduled(TinyRegressor):
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    ckpt = tmp_path / "float.ckpt"
    trainer = make_trainer(max_epochs=1)
    trainer.fit(Scheduled(), tiny_loader(batches=8))
    trainer.save_checkpoint(ckpt)

    class ScaleWatch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 9:  # one step after the scales were initialised at 8
                self.after_init = qat._weight_quantizers["fc1"].log_scale.detach().clone()

        def on_train_end(self, trainer, pl_module):
            self.groups = len(trainer.optimizers[0].param_groups)

    model = Scheduled()
    qat = QuantizationAwareTraining("int4", group_size=4, learn_ranges=True, start_step=8)
    watch = ScaleWatch()
    make_trainer(max_epochs=2, callbacks=[qat, watch]).fit(model, tiny_loader(batches=8), ckpt_path=ckpt)
    assert watch.groups == 1  # the user's optimizer is untouched
    assert not torch.equal(qat._weight_quantizers["fc1"].log_scale.detach(), watch.after_init)  # scales trained
    assert qat.state_dict()["range_optimizer"]["state"]  # Adam state is checkpointed


def test_reusing_a_callback_or_replacing_one_quantizes_each_model_once(seeded):
    qat = QuantizationAwareTraining("int4", group_size=4, activations="int8_dynamic", start_step=0)
    first, second = TinyRegressor(), TinyRegressor()
    make_trainer(max_epochs=1, callbacks=[qat]).fit(first, tiny_loader(batches=2))
    make_trainer(max_epochs=1, callbacks=[qat]).fit(second, tiny_loader(batches=2))
    assert not torch.equal(second.fc1.weight, raw_weight(second.fc1))  # the second model is quantized

    # A new callback on an already quantized model replaces the old quantizers.
    replacement = QuantizationAwareTraining("int8", start_step=0)
    make_trainer(max_epochs=1, callbacks=[replacement]).fit(first, tiny_loader(batches=2))
    assert quantized_weights(first)["fc1"].spec == QuantSpec(8, "channel")
    assert len(first.fc1._forward_pre_hooks) == 0  # the old input quantizer is gone


@pytest.mark.parametrize("learned", [True, False])
def test_quantized_weights_has_no_side_effects_before_start(seeded, learned):
    qat = QuantizationAwareTraining("int4", group_size=4, weight_range="mse", learn_ranges=learned, start_step=100)
    model = TinyRegressor()
    make_trainer(max_epochs=1, callbacks=[qat]).fit(model, tiny_loader(batches=2))
    quantizer = qat._weight_quantizers["fc1"]
    before = None if quantizer.log_scale is None else quantizer.log_scale.detach().clone()
    quantized_weights(model)
    assert not quantizer.initialized and quantizer.clip is None
    if learned:
        assert torch.equal(quantizer.log_scale.detach(), before)


def test_a_reused_mse_callback_chooses_the_ratios_of_each_model(seeded):
    qat = QuantizationAwareTraining("int4", group_size=4, weight_range="mse", start_step=0)
    first, second = TinyRegressor(), TinyRegressor()
    make_trainer(max_epochs=1, callbacks=[qat]).fit(first, tiny_loader(batches=2))
    first_clip = qat.state_dict()["layers"]["fc1"]["clip"]
    initial = as_matrix(second.fc1.weight.detach().clone())
    make_trainer(max_epochs=1, callbacks=[qat]).fit(second, tiny_loader(batches=2))
    second_clip = qat._weight_quantizers["fc1"].clip
    # Chosen from the second model's weights at its first step, not carried over.
    assert torch.equal(second_clip.cpu(), int4_mse_clip(initial, 4))
    assert not torch.equal(first_clip, second_clip.cpu())


def test_a_run_stopped_before_learned_ranges_start_exports_exactly_and_stays_unstarted(tmp_path, seeded):
    from lightning_compress import export

    qat = QuantizationAwareTraining("int4", group_size=4, weight_range="mse", learn_ranges=True, start_step=100)
    model = TinyRegressor()
    make_trainer(max_epochs=1, callbacks=[qat]).fit(model, tiny_loader(batches=2))
    before = {name: q.log_scale.detach().clone() for name, q in qat._weight_quantizers.items()}
    expected = quantized_weights(model)
    # The parity check runs the model with fake quantization on: the grid it computes with is
    # the one quantized_weights reported (exp(log(scale)), as after start), bit for bit.
    report = export(model, tmp_path / "out", inputs=[torch.randn(4, 4, 8)])
    assert report.parity.weights_exact and report.parity.relative_error == 0.0
    for name, quantizer in qat._weight_quantizers.items():
        # Measuring did not start QAT: start_step still initialises the scales from the weights then.
        assert not quantizer.initialized and not quantizer.enabled, name
        assert torch.equal(quantizer.log_scale.detach().cpu(), before[name].cpu()), name
        assert torch.equal(quantized_weights(model)[name].codes, expected[name].codes), name


def test_bf16_weights_dequantize_exactly_in_their_dtype(seeded):
    model = TinyRegressor().to(torch.bfloat16)
    from lightning_compress.quant import round_to_nearest

    assert round_to_nearest(model, QuantSpec(4, "group", 4))
    for name, entry in quantized_weights(model).items():
        assert entry.dtype == torch.bfloat16
        assert torch.equal(entry.dequantize(), model.get_submodule(name).weight), name


def test_embedding_layers_are_quantized_per_row_when_targeted():
    from lightning_compress.quant import round_to_nearest

    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    rows = model[0].weight.detach().clone()
    round_to_nearest(model, QuantSpec(4, "channel"), targets=[nn.Embedding])
    assert torch.equal(model[0].weight, torchao_fake_quant(rows, 4))
    assert torch.equal(model(torch.tensor([3]))[0], model[1](model[0].weight[3]))
    assert set(quantized_weights(model)) == {"0"}


def test_a_start_step_the_run_never_reaches_is_warned_about(seeded):
    """As MagnitudePruning warns of an end_step after the run: without the warning the
    model ends in float and looks like a QAT result."""
    model = TinyRegressor()
    qat = QuantizationAwareTraining("int4", group_size=16, start_step=100, exclude=["conv"])
    with pytest.warns(UserWarning, match=r"`start_step` resolves to step 100 but this run has 4 optimizer steps: no"
                                         r" step trains with fake quantization"):
        make_trainer(max_steps=4, callbacks=[qat]).fit(model, tiny_loader())
    assert torch.equal(model.fc1.weight, raw_weight(model.fc1))  # in float


class RawGradients(Callback):
    """The raw (latent) weights' gradients of the first backward."""

    def __init__(self):
        self.grads = None

    def on_after_backward(self, trainer, pl_module):
        if self.grads is None:
            self.grads = {n: raw_weight(pl_module.get_submodule(n)).grad.clone() for n in ("conv", "fc1", "fc2")}


def test_ewgs_scales_the_latent_weights_gradients_in_a_training_step(seeded):
    """The same batch and weights with and without `ewgs_delta`: each latent weight's
    gradient is the plain STE's times 1 + delta * sign(g) * (w/s - round(w/s)), on the grid
    the quantizer used (hand formula; the plain STE is checked against torchao elsewhere)."""
    grads, grids, weights = {}, {}, {}
    for delta in (0.0, 0.3):
        torch.manual_seed(0)
        model, capture = TinyRegressor(optimizer="sgd", lr=0.0), RawGradients()
        qat = QuantizationAwareTraining("int4", group_size=16, weight_range="mse", ewgs_delta=delta,
                                        overrides={"conv": {"granularity": "channel"}})
        make_trainer(max_steps=1, callbacks=[qat, capture]).fit(model, tiny_loader())
        grads[delta] = capture.grads
        grids[delta] = {k: (q.scale, q.zero_point, q.spec) for k, q in quantized_weights(model).items()}
        weights[delta] = {n: raw_weight(model.get_submodule(n)).detach() for n in ("conv", "fc1", "fc2")}
    for name, plain in grads[0.0].items():
        assert torch.equal(weights[0.3][name], weights[0.0][name])  # lr 0: the weights of the backward
        scale, zero_point, spec = grids[0.3][name]
        matrix = as_matrix(weights[0.3][name]).double()
        width = matrix.numel() // scale.numel()
        steps = (matrix.reshape(-1, width).float() * (1.0 / scale.reshape(-1, 1))).double()
        residual = (steps - steps.round()).reshape(plain.shape)
        expected = plain.double() * (1 + 0.3 * plain.double().sign() * residual)
        torch.testing.assert_close(grads[0.3][name].double(), expected, rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.equal(grads[0.3][name], plain), name


def _trained_state(model):
    """Everything the trained fake quantization holds: effective weights and quantizer state."""
    state = {f"{n}.weight": model.get_submodule(n).weight.detach().clone() for n in LAYERS}
    for name, codes in quantized_weights(model).items():
        state[f"{name}.scale"] = codes.scale.clone()
    return state


QAT_SETTINGS = dict(weights="int4", group_size=4, weight_range="mse", learn_ranges=True, activations="int8_static",
                    start_step=0)


def test_a_new_qat_callback_takes_over_the_trained_grid_in_validate_and_a_second_fit(seeded):
    """An earlier Trainer's quantizers were replaced by new ones, off until training starts:
    `validate` measured the float model and left it float (an export then packed PTQ)."""
    model, val = TinyRegressor(), tiny_loader(batches=2, seed=3)
    make_trainer(max_steps=6, callbacks=[QuantizationAwareTraining(**QAT_SETTINGS)]).fit(model, tiny_loader())
    trained = _trained_state(model)
    quantized_loss = make_trainer().validate(model, val, verbose=False)[0]["val/loss"]
    float_loss = make_trainer().validate(_float_copy(model), val, verbose=False)[0]["val/loss"]
    assert quantized_loss != pytest.approx(float_loss, rel=1e-4)

    again = QuantizationAwareTraining(**QAT_SETTINGS)
    assert make_trainer(callbacks=[again]).validate(model, val, verbose=False)[0]["val/loss"] == quantized_loss
    after = _trained_state(model)
    assert all(torch.equal(after[key], trained[key]) for key in trained)

    # A second fit goes on from the trained grid: its first forward computes with the trained weights.
    first_forward = {}

    class FirstWeights(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                first_forward.update(_trained_state(pl_module))

    make_trainer(max_steps=1, callbacks=[QuantizationAwareTraining(**QAT_SETTINGS), FirstWeights()]).fit(
        model, tiny_loader())
    assert all(torch.equal(first_forward[key], trained[key]) for key in trained)


def _float_copy(model):
    plain = TinyRegressor()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "log_scale" not in k}, strict=False)
    return plain


@pytest.mark.parametrize("change, message", [
    ({"weights": "int8", "group_size": None}, r"layer 'conv' has grid 'int4 g4 sym', this callback 'int8 channel sym';"
     r" layer 'fc1' .*\. This callback would put a new grid on those layers, off until training starts, so the"
     r" validate would measure them in float; validate with the settings the model was quantized with and the same"
     r" targets, from a checkpoint \(`ckpt_path`\), or with no"),
    ({"learn_ranges": False}, r"layer 'conv' has learn_ranges True, this callback False"),
    ({"activations": "int8_dynamic"}, r"layer 'conv' has activations 'int8_static', this callback 'int8_dynamic'"),
])
def test_validating_with_other_qat_settings_is_refused_and_leaves_the_trained_grid(seeded, change, message):
    model, val = TinyRegressor(), tiny_loader(batches=2, seed=3)
    make_trainer(max_steps=4, callbacks=[QuantizationAwareTraining(**QAT_SETTINGS)]).fit(model, tiny_loader())
    trained = _trained_state(model)
    other = QuantizationAwareTraining(**{**QAT_SETTINGS, **change})
    with pytest.raises(ValueError, match=r"the model holds fake quantization from an earlier QuantizationAwareTraining:"
                                         r" " + message):
        make_trainer(callbacks=[other]).validate(model, val, verbose=False)
    after = _trained_state(model)
    assert all(torch.equal(after[key], trained[key]) for key in trained)


def _observers(model):
    from lightning_compress.quant.activations import input_quantizer_of

    return {n: input_quantizer_of(model.get_submodule(n)).state_dict() for n in LAYERS}


def test_static_observers_are_taken_over_with_their_ranges(seeded):
    model = TinyRegressor()
    make_trainer(max_steps=4, callbacks=[QuantizationAwareTraining(**QAT_SETTINGS)]).fit(model, tiny_loader())
    trained = _observers(model)
    make_trainer(callbacks=[QuantizationAwareTraining(**QAT_SETTINGS)]).validate(model, tiny_loader(batches=1),
                                                                             verbose=False)
    after = _observers(model)
    for name in LAYERS:
        assert torch.equal(after[name]["low"], trained[name]["low"])
        assert torch.equal(after[name]["high"], trained[name]["high"])
        assert after[name]["calibrating"] == trained[name]["calibrating"]


class RecurrentRegressor(TinyRegressor):
    """A GRU between the conv and the head: weight-only under `activations` (no input quantizer)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 8, batch_first=True)

    def forward(self, x):
        h, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.fc2(torch.relu(self.fc1(h.transpose(1, 2).flatten(1))))


def test_a_recurrent_layer_without_input_quantizer_is_taken_over_with_activations(seeded):
    """QAT puts no input quantizer on a recurrent layer: its "activations None" was read as a
    difference from the callback's, so an evaluation with the same settings was refused."""
    settings = dict(weights="int4", group_size=4, activations="int8_dynamic", start_step=0)
    model, val = RecurrentRegressor(), tiny_loader(batches=2, seed=3)
    make_trainer(max_steps=3, callbacks=[QuantizationAwareTraining(**settings)]).fit(model, tiny_loader())
    quantized = make_trainer().validate(model, val, verbose=False)[0]["val/loss"]
    again = make_trainer(callbacks=[QuantizationAwareTraining(**settings)]).validate(model, val, verbose=False)
    assert again[0]["val/loss"] == quantized


def test_an_evaluation_of_a_model_quantized_on_fewer_layers_is_refused_naming_them(seeded):
    """fc1 taken over, conv and fc2 new and off: the validate measured them in float."""
    model = TinyRegressor()
    make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8", targets=["fc1"])]).fit(
        model, tiny_loader())
    with pytest.raises(ValueError, match=r"from an earlier QuantizationAwareTraining: 'conv', 'fc2' hold none\. This"
                                         r" callback would put a new grid on those layers"):
        make_trainer(callbacks=[QuantizationAwareTraining("int8")]).validate(model, tiny_loader(batches=1))
    assert quantized_weights(model).keys() == {"fc1"}


def test_an_evaluation_from_a_checkpoint_is_not_refused_for_what_the_model_holds(tmp_path, seeded):
    """The checkpoint restores this callback's grid: what the model in memory holds before is replaced."""
    model = TinyRegressor()
    trainer = make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8", start_step=0)])
    trainer.fit(model, tiny_loader())
    trainer.save_checkpoint(tmp_path / "int8.ckpt")
    expected = make_trainer().validate(model, tiny_loader(batches=1), verbose=False)[0]["val/loss"]
    make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int4", group_size=4, start_step=0)]).fit(
        model, tiny_loader())
    evaluated = make_trainer(callbacks=[QuantizationAwareTraining("int8", start_step=0)]).validate(
        model, tiny_loader(batches=1), ckpt_path=tmp_path / "int8.ckpt", verbose=False)
    assert evaluated[0]["val/loss"] == expected


def test_a_round_to_nearest_model_is_named_as_such_when_refused(seeded):
    from lightning_compress.quant import round_to_nearest

    model = TinyRegressor()
    round_to_nearest(model, QuantSpec(4, "group", 4))
    with pytest.raises(ValueError, match=r"the model holds fake quantization from round_to_nearest: layer 'conv' has"
                                         r" grid 'int4 g4 sym', this callback 'int8 channel sym'"):
        make_trainer(callbacks=[QuantizationAwareTraining("int8")]).validate(model, tiny_loader(batches=1))
    taken = make_trainer(callbacks=[QuantizationAwareTraining("int4", group_size=4)])
    assert taken.validate(model, tiny_loader(batches=1), verbose=False)[0]["val/loss"] == make_trainer().validate(
        model, tiny_loader(batches=1), verbose=False)[0]["val/loss"]


def test_a_refused_evaluation_leaves_the_model_as_it_was_whatever_stops_it(tmp_path, seeded):
    """The new callback's quantizers were attached at setup and put back only at the
    evaluation's start: a loop with no batches, or an error before it (a mistyped
    ckpt_path), left them on the model, off, and the trained grid gone."""
    model = TinyRegressor()
    make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int4", group_size=4, start_step=0)]).fit(
        model, tiny_loader())
    trained = _trained_state(model)
    other = QuantizationAwareTraining("int8")
    make_trainer(callbacks=[other], limit_val_batches=0).validate(model, tiny_loader(batches=1))  # nothing measured
    with pytest.raises(FileNotFoundError):
        make_trainer(callbacks=[QuantizationAwareTraining("int8")]).validate(
            model, tiny_loader(batches=1), ckpt_path=tmp_path / "missing.ckpt")
    after = _trained_state(model)
    assert all(torch.equal(after[key], trained[key]) for key in trained)
    assert {codes.spec for codes in quantized_weights(model).values()} == {QuantSpec(4, "group", 4)}
    # The callback is not left half set up: a fit with it starts a new stage on the int8 grid.
    make_trainer(max_steps=1, callbacks=[other]).fit(model, tiny_loader())
    assert {codes.spec for codes in quantized_weights(model).values()} == {QuantSpec(8, "channel")}


def test_an_evaluation_from_a_checkpoint_that_does_not_give_the_grid_leaves_the_model_as_it_was(tmp_path, seeded):
    """The new quantizers were attached when the checkpoint's state arrived, and the state
    refused only then: the model lost its trained grid. A checkpoint of fewer layers lifted
    the refusal, and the others were measured in float."""
    model = TinyRegressor()
    trainer = make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int4", group_size=4, start_step=0)])
    trainer.fit(model, tiny_loader())
    trainer.save_checkpoint(tmp_path / "int4.ckpt")
    partial = TinyRegressor()
    fewer = make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8", targets=["fc1"], start_step=0)])
    fewer.fit(partial, tiny_loader())
    fewer.save_checkpoint(tmp_path / "fc1.ckpt")
    plain = make_trainer(max_steps=1)
    plain.fit(TinyRegressor(), tiny_loader())
    plain.save_checkpoint(tmp_path / "float.ckpt")
    held = {name: get_weight_transform(model.get_submodule(name), Stage.FAKE_QUANT) for name in LAYERS}
    cases = [("int4.ckpt", r"layer 'conv' was trained with int4 g4 sym but this callback quantizes it as int8 channel"
                           r" sym; .*so it would be evaluated on a grid it was not trained on"),
             ("fc1.ckpt", r"the checkpoint holds no QAT state for 'conv'; the checkpoint holds no QAT state for 'fc2'"),
             ("float.ckpt", r"from an earlier QuantizationAwareTraining: .*; the checkpoint given \(.*float.ckpt\) holds"
                            r" no QAT state$")]
    for checkpoint, message in cases:
        with pytest.raises(ValueError, match=message):
            make_trainer(callbacks=[QuantizationAwareTraining("int8")]).validate(
                model, tiny_loader(batches=1), ckpt_path=tmp_path / checkpoint)
        # (Lightning loads the checkpoint's weights into the model first; the quantizers stay)
        assert all(get_weight_transform(model.get_submodule(n), Stage.FAKE_QUANT) is held[n] for n in LAYERS)
        assert all(held[n].enabled and held[n].spec == QuantSpec(4, "group", 4) for n in LAYERS), checkpoint


def test_static_observers_in_eval_mode_during_training_are_warned_about(seeded):
    """model.eval() before fit: Lightning keeps the mode, the observers never saw a range,
    and only the export at the end said so."""
    model = TinyRegressor()
    model.eval()
    with pytest.warns(UserWarning, match=r"a layer with static int8 activations ran in eval mode in a training step"):
        make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining("int8", activations="int8_static",
                                                                       start_step=0)]).fit(model, tiny_loader())


class CrossAttention(TinyRegressor):
    """nn.MultiheadAttention with separate q/k/v weights (kdim != embed_dim): one input stage."""

    def __init__(self):
        super().__init__()
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)

    def forward(self, x):
        tokens = x.transpose(1, 2)  # [batch, 8 positions, 4 channels]
        h = torch.relu(self.conv(x)).transpose(1, 2)  # [batch, 8, 8]
        return self.fc2(torch.relu(self.fc1(self.cross(h, tokens, tokens, need_weights=False)[0].flatten(1))))


def test_an_evaluation_targeting_another_weight_of_a_quantized_attention_layer_is_refused(seeded):
    """q_proj_weight quantized before holds the layer's input range; a callback on
    k_proj_weight found nothing held and replaced that observer."""
    from lightning_compress.quant.activations import input_quantizer_of

    settings = dict(weights="int8", activations="int8_static", start_step=0)
    model = CrossAttention()
    make_trainer(max_steps=2, callbacks=[QuantizationAwareTraining(targets=["cross.q_proj_weight"], **settings)]).fit(
        model, tiny_loader())
    observer = input_quantizer_of(model.cross)
    with pytest.raises(ValueError, match=r"from an earlier QuantizationAwareTraining: 'cross.k_proj_weight' hold none"):
        make_trainer(callbacks=[QuantizationAwareTraining(targets=["cross.k_proj_weight"], **settings)]).validate(
            model, tiny_loader(batches=1))
    assert input_quantizer_of(model.cross) is observer and observer.low is not None
