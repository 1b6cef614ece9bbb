"""QAT's calibrated starting points (``init="gptq"|"awq"``, ``smoothing``) in real Trainers.

The numerics (GPTQ, AWQ's search, SmoothQuant's scales) are checked against reference
implementations in test_calibration_numerics.py; here: that the callback feeds them the
inputs the layers really saw in the calibration batches, that the first fake-quantized
forward is the calibrated model, that folding keeps the float model's function, and that
runs resume bit for bit.
"""

import dataclasses
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress import IncompatibleLayersSkipped, MagnitudePruning, QuantizationAwareTraining, export
from lightning_compress import quantized_weights
from lightning_compress.callbacks.compatibility import IncompatibleSettings
from lightning_compress.core.transforms import Stage, get_weight_transform, is_transformed
from lightning_compress.core.validate import ArgumentError
from lightning_compress.quant.fake_quant import choose_qparams, fake_quantize
from lightning_compress.quant.gptq import gptq_quantize
from lightning_compress.quant.smoothing import awq_scales, smoothquant_scales
from lightning_compress.quant.spec import QuantSpec
from tests.conftest import StopAfterEpoch, TinyRegressor, make_trainer, tiny_loader

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 64, 32
SPEC = QuantSpec(4, "group", 16)


class TinyLlama(pl.LightningModule):
    """A transformers LlamaForCausalLM (1 block, multi-head attention) as a LightningModule."""

    def __init__(self, kv_heads: int = 2) -> None:
        super().__init__()
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=kv_heads, intermediate_size=64,
                                          max_position_embeddings=32)
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(batches: int = 6, seed: int = 0):
    # A skewed token distribution, so some embedding channels are outliers.
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batches * 4, 12), generator=generator) % (VOCAB // 2 + 7)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)


def llama(kv_heads: int = 2, seed: int = 0) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(kv_heads)


LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Recorder(pl.Callback):
    """Inputs of the given Linear layers in every training forward, and each layer's raw
    weight and effective (fake-quantized) weight at the first batch of ``step``."""

    def __init__(self, names, step):
        self.names, self.step = names, step
        self.inputs = {n: [] for n in names}
        self.before, self.effective = {}, {}

    def on_fit_start(self, trainer, pl_module):
        modules = dict(pl_module.named_modules())
        for name in self.names:
            modules[name].register_forward_pre_hook(
                lambda m, args, name=name: self.inputs[name].append(args[0].detach().clone()) if m.training else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.before:
            modules = dict(pl_module.named_modules())
            self.before = {n: modules[n]._parameters["weight"].detach().clone() for n in self.names}
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step and not self.effective:
            modules = dict(pl_module.named_modules())
            self.effective = {n: modules[n].weight.detach().clone() for n in self.names}
            self.raw = {n: modules[n]._parameters["weight"].detach().clone() for n in self.names}
            self.started = {k: v.clone() for k, v in pl_module.state_dict().items()}


def hessian(batches):
    """Sum over the batches of xᵀx over each batch's rows, in float32."""
    total = 0
    for batch in batches:
        x = batch.reshape(-1, batch.shape[-1]).float()
        total = total + x.T @ x
    return total


def fit(model, callbacks, *, steps=4, loader=None, **trainer_options):
    trainer = make_trainer(max_steps=steps, callbacks=callbacks, **trainer_options)
    trainer.fit(model, loader or token_loader())
    return trainer


def names(model, suffixes):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in suffixes]


# ---------------------------------------------------------------------------- GPTQ
def test_gptq_start_is_gptq_of_the_recorded_inputs_and_the_grid_stays_fixed(seeded):
    model = llama()
    layers = names(model, LINEAR_TARGETS)
    recorder = Recorder(layers, step=2)
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=2, start_step=2,
                                    targets=LINEAR_TARGETS)
    fit(model, [qat, recorder], steps=4)
    for name in layers:
        # The two calibration batches are the forwards of steps 0 and 1.
        expected, scale, zero_point = gptq_quantize(recorder.before[name].float(), hessian(recorder.inputs[name][:2]),
                                                    SPEC)
        assert torch.equal(recorder.effective[name], expected), name
        assert torch.equal(recorder.raw[name], expected), name  # the raw weight starts on the grid
        quantizer = get_weight_transform(dict(model.named_modules())[name], Stage.FAKE_QUANT)
        assert torch.equal(quantizer.grid[0], scale) and torch.equal(quantizer.grid[1], zero_point), name
    # After start the grid is GPTQ's, not the min/max of later weights: the export reads it.
    exported = quantized_weights(model)
    for name in layers:
        quantizer = get_weight_transform(dict(model.named_modules())[name], Stage.FAKE_QUANT)
        assert torch.equal(exported[name].scale.flatten(), quantizer.grid[0].cpu())
        assert torch.equal(exported[name].dequantize(), dict(model.named_modules())[name].weight.detach())
    # And it rounds better than round-to-nearest for the inputs it was calibrated on.
    for name in layers:
        x = torch.cat([r.reshape(-1, r.shape[-1]) for r in recorder.inputs[name][:2]])
        weight = recorder.before[name]
        rtn = fake_quantize(weight, *choose_qparams(weight, SPEC), SPEC)
        error = lambda w: (x @ (weight - w).T).square().sum().item()  # noqa: E731
        assert error(recorder.effective[name]) < error(rtn), name


def test_gptq_rounds_conv2d_layers_from_their_unfolded_inputs(seeded):
    from lightning_compress.examples.digits import DigitsClassifier, DigitsDataModule
    from lightning_compress.quant.gptq import conv_columns

    model = DigitsClassifier(arch="cnn", hidden=32)
    recorder = Recorder(["net.0", "net.3", "net.8"], step=1)
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=1, start_step=1,
                                    targets=["net.3", "net.8"])
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    fit(model, [qat, recorder], steps=2, loader=data.train_dataloader())
    conv = model.net[3]
    # The conv's Hessian, from its step-0 input unfolded by hand into [positions, in * 3 * 3].
    x = F.unfold(recorder.inputs["net.3"][0], kernel_size=3, padding=1).transpose(1, 2).reshape(-1, 16 * 9)
    torch.testing.assert_close(conv_columns(recorder.inputs["net.3"][0], conv), x)
    expected, _, _ = gptq_quantize(recorder.before["net.3"].reshape(32, -1), x.T @ x, SPEC)
    torch.testing.assert_close(recorder.effective["net.3"].reshape(32, -1), expected, rtol=0, atol=1e-6)


def test_gptq_learned_ranges_start_from_gptq_exactly(seeded):
    model = llama()
    layers = names(model, ["q_proj", "down_proj"])
    recorder = Recorder(layers, step=1)
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=1, start_step=1,
                                    learn_ranges=True, targets=["q_proj", "down_proj"])
    fit(model, [qat, recorder], steps=2)
    for name in layers:
        quantizer = get_weight_transform(dict(model.named_modules())[name], Stage.FAKE_QUANT)
        assert quantizer.grid is None and quantizer.initialized
        # GPTQ's own scales were put through exp(log(.)), which the learned forward computes.
        h = hessian(recorder.inputs[name][:1])
        choose = lambda m: _exp_log(choose_qparams(m, SPEC))  # noqa: E731
        expected, _, _ = gptq_quantize(recorder.before[name].float(), h, SPEC, choose)
        assert torch.equal(recorder.effective[name], expected), name


def _exp_log(grid):
    scale, zero_point = grid
    return scale.log().exp(), zero_point


def test_gptq_keeps_pruned_weights_zero_whatever_the_callback_order(seeded):
    results = []
    for order in (0, 1):
        model = llama()
        qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=1, start_step=2,
                                        targets=LINEAR_TARGETS)
        # The last mask update is at step 2, the step GPTQ starts at.
        pruning = MagnitudePruning(0.5, start_step=1, end_step=2, targets=LINEAR_TARGETS)
        fit(model, [qat, pruning] if order == 0 else [pruning, qat], steps=3)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        for name in names(model, LINEAR_TARGETS):
            # GPTQ's error compensation put nothing into the pruned half.
            assert (dict(model.named_modules())[name].weight == 0).float().mean() >= 0.5, name
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


# ---------------------------------------------------------------------------- AWQ
def test_awq_start_keeps_the_float_function_and_beats_round_to_nearest(seeded):
    model = llama(kv_heads=2)
    layers = names(model, LINEAR_TARGETS)
    recorder = Recorder(layers, step=2)
    qat = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=2, start_step=2,
                                    targets=LINEAR_TARGETS)
    ids = next(iter(token_loader()))[0]

    class FloatOutput(pl.Callback):
        """The model's float output just before and just after the scales are folded."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and not hasattr(self, "before"):
                with torch.no_grad():
                    self.before = pl_module(ids.to(pl_module.device))

        def on_before_backward(self, trainer, pl_module, loss):
            if trainer.global_step == 2 and not hasattr(self, "after"):
                for q in qat._weight_quantizers.values():
                    q.enabled = False
                with torch.no_grad():
                    self.after = pl_module(ids.to(pl_module.device))
                for q in qat._weight_quantizers.values():
                    q.enabled = True

    probe = FloatOutput()
    fit(model, [probe, qat, recorder], steps=3)  # the probe's forward comes before QAT's batch start
    torch.testing.assert_close(probe.after, probe.before, rtol=1e-4, atol=1e-5)
    # q/k/v read input_layernorm: one shared AWQ search over the three, on step 0-1 inputs.
    qkv = [n for n in layers if n.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj")]
    x = torch.cat([r.reshape(-1, HIDDEN) for r in recorder.inputs[qkv[0]][:2]])
    search = awq_scales(x, [recorder.before[n] for n in qkv], SPEC)
    norm = "model.model.layers.0.input_layernorm.weight"
    assert torch.equal(recorder.started[norm], recorder.state[norm] / search.scales)
    # v_proj is also the smooth module of o_proj (multi-head attention: the shapes agree):
    # its output rows are then divided by o_proj's own scales, searched on o_proj's inputs.
    o_proj = [n for n in layers if n.endswith("o_proj")][0]
    o_inputs = torch.cat([r.reshape(-1, HIDDEN) for r in recorder.inputs[o_proj][:2]])
    o_scales = awq_scales(o_inputs, [recorder.before[o_proj]], SPEC).scales
    assert torch.equal(recorder.raw[o_proj], recorder.before[o_proj] * o_scales)
    for n in qkv:
        scaled = recorder.before[n] * search.scales
        if n.endswith("v_proj"):  # folded first: transformers registers self_attn before input_layernorm
            scaled = recorder.before[n] / o_scales[:, None] * search.scales
        assert torch.equal(recorder.raw[n], scaled), n
        expected = fake_quantize(scaled, *choose_qparams(scaled, SPEC), SPEC)
        assert torch.equal(recorder.effective[n], expected), n
    assert search.loss <= search.rtn_loss


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("setting", [dict(init="awq"), dict(smoothing=0.5, activations="int8_dynamic")])
def test_awq_and_smoothing_fold_under_bf16(seeded, precision, setting):
    # The fold check compared bf16 outputs with a float32 tolerance and refused every
    # bf16 run at start_step (a new user's trial); now it checks outside autocast with a
    # tolerance of the weights' dtype. The folded norm is the trained one over the scales.
    model = llama()
    bits = {"init": "int4"}.get(next(iter(setting)), "int8")
    qat = QuantizationAwareTraining(bits, group_size=16, calibration_batches=2, start_step=2,
                                    targets=LINEAR_TARGETS, **setting)
    norm = "model.model.layers.0.input_layernorm.weight"
    ids = next(iter(token_loader()))[0]

    class AroundTheStart(pl.Callback):
        """The norm's weight and the float model's output just before and after the fold."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                self.norm_before = dict(pl_module.named_parameters())[norm].detach().clone()
                with torch.no_grad():
                    self.before = pl_module(ids.to(pl_module.device)).float()

        def on_before_backward(self, trainer, pl_module, loss):
            if trainer.global_step == 2:
                self.norm_after = dict(pl_module.named_parameters())[norm].detach().clone()
                for q in qat._weight_quantizers.values():
                    q.enabled = False
                with torch.no_grad():
                    self.after = pl_module(ids.to(pl_module.device)).float()
                for q in qat._weight_quantizers.values():
                    q.enabled = True

    probe = AroundTheStart()
    fit(model, [probe, qat], steps=3, precision=precision)
    assert qat._calibration.applied
    assert probe.norm_after.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert not torch.equal(probe.norm_after, probe.norm_before)  # divided by the scales...
    error = (probe.after - probe.before).norm() / probe.before.norm()
    assert error < 0.02, error  # ...keeping the model's function up to bf16 rounding


def test_awq_under_grouped_query_attention_leaves_o_proj_unmapped_and_names_it(seeded):
    model = llama(kv_heads=1)
    qat = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=1, start_step=1,
                                    targets=LINEAR_TARGETS)
    with pytest.raises(ValueError, match=r"o_proj.*mappings"):
        fit(model, [qat], steps=2)


def test_awq_under_grouped_query_attention_names_o_proj_and_skips_it_when_asked(seeded):
    # A new user's trial: `on_incompatible="skip"` left AWQ's uncovered layers an error.
    o_proj = "model.model.layers.0.self_attn.o_proj"
    qat = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=1, start_step=1,
                                    exclude=["lm_head"])
    with pytest.raises(IncompatibleSettings, match=rf"cannot quantize layer '{o_proj}' \(Linear\): init='awq' has"
                       r" nowhere.*grouped-query attention(?s:.*)on_incompatible='skip'") as error:
        fit(llama(kv_heads=1), [qat], steps=2)
    assert f"exclude=['{o_proj}']" in str(error.value)
    model = llama(kv_heads=1)
    qat = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=1, start_step=1,
                                    exclude=["lm_head"], on_incompatible="skip")
    with pytest.warns(IncompatibleLayersSkipped, match=rf"leaves 1 layer in float:\n  - '{o_proj}': init='awq'"):
        fit(model, [qat], steps=3)
    assert qat._calibration.applied
    assert set(qat.layer_specs) == set(names(model, LINEAR_TARGETS)) - {o_proj}
    assert not is_transformed(dict(model.named_modules())[o_proj])


def test_the_readme_awq_example_trains_a_grouped_query_mistral(seeded):
    """README: AWQ on every Linear but the head and o_proj, o_proj in a second callback."""
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = TinyLlama()
    model.model = transformers.MistralForCausalLM(config)
    awq = QuantizationAwareTraining("int4", group_size=16, init="awq", exclude=["lm_head", "o_proj"], name="awq",
                                    calibration_batches=1, start_step=1)
    rest = QuantizationAwareTraining("int4", group_size=16, weight_range="mse", targets=["o_proj"], name="o_proj",
                                     start_step=1)
    fit(model, [awq, rest], steps=3)
    assert awq._calibration.applied
    assert set(rest.layer_specs) == {"model.model.layers.0.self_attn.o_proj"}
    assert set(awq.layer_specs) == set(names(model, LINEAR_TARGETS)) - set(rest.layer_specs)


def test_awq_on_a_model_without_mappings_names_every_layer_and_mappings_fix_it(seeded):
    qat = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=1, start_step=1,
                                    targets=[nn.Linear])
    with pytest.raises(IncompatibleSettings, match=r"(?s)'fc1'.*no built-in mapping.*covers it.*'fc2'.*covers it"):
        fit(TinyRegressor(), [qat], steps=2, loader=tiny_loader())
    # fc1 reads relu(conv(x)), which is not linear in conv's output: only fc1 -> fc2 with a
    # norm in between could be folded, so a user mapping of fc1 -> fc2 is accepted (the
    # user asserts it), and the run trains.
    model = TinyRegressor()
    qat = QuantizationAwareTraining("int8", init="awq", calibration_batches=1, start_step=1, targets=["fc2"],
                                    mappings={"fc1": ["fc2"], "fc_1": ["fc2"]})
    # A new user's trial: an entry the targeted layers did not need passed in silence.
    with pytest.warns(UserWarning, match=r"`mappings` entries \['fc_1'\] match nothing in the model and are not"
                      r" used: 'fc_1' names no module\. Close names: fc1"):
        fit(model, [qat], steps=2, loader=tiny_loader())
    assert qat._calibration.applied


@pytest.mark.parametrize("mappings, reason", [
    ({"fc0": ["fc2"]}, r"'fc0' names no module\. Close names: fc\d, fc\d"),
    ({"fc1": ["fc3"]}, r"'fc3' \(under 'fc1'\) names no module"),
    ({"conv": ["fc2"]}, r"'conv' \(Conv1d\) is neither a norm with a 1-D weight nor an nn.Linear"),
    ({"fc2": ["fc1"]}, r"'fc1' reads 64 features but 'fc2' gives 8"),
    ({"fc1": ["conv"]}, r"'conv' is Conv1d: mappings scale the input columns of nn.Linear layers only"),
])
def test_user_mappings_that_match_nothing_say_why(seeded, mappings, reason):
    # They all used to give one message, "no `mappings` ... covers ['fc2']" (a new user's trial).
    qat = QuantizationAwareTraining("int8", init="awq", calibration_batches=1, start_step=1, targets=["fc2"],
                                    mappings=mappings)
    with pytest.raises(IncompatibleSettings, match=r"nowhere to fold its per-channel scales for 'fc2': no entry of"
                       r" `mappings` \{.*\} can cover it: ") as error:
        fit(TinyRegressor(), [qat], steps=2, loader=tiny_loader())
    assert re.search(reason, str(error.value)), str(error.value)


def test_a_layer_under_two_mappings_is_refused_naming_both(seeded):
    model = OffsetFreeModel()
    qat = QuantizationAwareTraining("int8", init="awq", calibration_batches=1, start_step=1, targets=["fc2"],
                                    mappings={"norm": ["fc2"], "fc1": ["fc2"]})
    with pytest.raises(ValueError, match=r"lists 'fc2' under both '(norm|fc1)' and '(fc1|norm)'"):
        fit(model, [qat], steps=2, loader=tiny_loader())


class OffsetFreeModel(TinyRegressor):
    """fc1 -> LayerNorm -> fc2."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(self.norm(self.fc1(h)))


# ---------------------------------------------------------------------------- SmoothQuant
def test_smoothing_divides_the_activation_outliers_by_the_smoothquant_scales(seeded):
    model = llama()
    layers = names(model, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    recorder = Recorder(layers, step=2)
    qat = QuantizationAwareTraining("int8", activations="int8_dynamic", smoothing=0.5, calibration_batches=2,
                                    start_step=2, targets=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    fit(model, [qat, recorder], steps=3)
    q = layers[0]
    x = torch.cat([r.reshape(-1, HIDDEN) for r in recorder.inputs[q][:2]])
    qkv = layers[:3]
    weight_max = torch.stack([recorder.before[n].abs().amax(dim=0) for n in qkv]).amax(dim=0)
    scales = smoothquant_scales(x.abs().amax(dim=0), weight_max, 0.5)
    # By hand: s_j = sqrt(max|x_j| / max|w_j|).
    torch.testing.assert_close(scales, (x.abs().amax(dim=0) / weight_max).sqrt())
    for n in qkv:
        assert torch.equal(recorder.raw[n], recorder.before[n] * scales), n
    # The step-2 input of q_proj is the step-2 norm output divided by s.
    step2 = recorder.inputs[q][2].reshape(-1, HIDDEN)
    assert (step2.abs().amax(dim=0) * scales).max() > step2.abs().amax(dim=0).max()


# ---------------------------------------------------------------------------- resume, DDP-free state
@pytest.mark.parametrize("init", ["gptq", "awq"])
def test_resume_inside_the_calibration_window_and_after_the_start_is_bit_exact(tmp_path, init):
    def run(extra, ckpt_path=None, epochs=3):
        model = llama()
        torch.manual_seed(1)
        qat = QuantizationAwareTraining("int4", group_size=16, init=init, calibration_batches=4, start_step=5,
                                        targets=LINEAR_TARGETS)
        trainer = make_trainer(max_epochs=epochs, callbacks=[qat, *extra])
        trainer.fit(model, token_loader(batches=3), ckpt_path=ckpt_path)
        return model

    reference = run([])
    for stop in (0, 1):  # epoch 0 ends at step 3 (inside the window 1..4), epoch 1 at step 6 (after start 5)
        checkpoint = tmp_path / f"stop{stop}.ckpt"
        run([StopAfterEpoch(stop, checkpoint)])
        resumed = run([], checkpoint)
        for key, value in reference.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[key]), (stop, key)
    # The export packs the calibrated grid the resumed run computed with.
    report = export(resumed, tmp_path / "packed", inputs=[next(iter(token_loader()))[0]])
    assert report.parity.weights_exact and report.parity.relative_error == 0.0
    other = QuantizationAwareTraining("int4", group_size=16, start_step=5, targets=LINEAR_TARGETS)
    with pytest.raises(ValueError, match=r"`init`: '%s' in the checkpoint, None now" % init):
        make_trainer(max_epochs=3, callbacks=[other]).fit(llama(), token_loader(batches=3), ckpt_path=checkpoint)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, argument", [
    (dict(init="gtpq"), "init"),
    (dict(init="gptq", calibration_batches=0), "calibration_batches"),
    (dict(calibration_batches=8), "calibration_batches"),  # no init, no smoothing: it would do nothing
    (dict(smoothing=0.5), "smoothing"),  # weight-only
    (dict(smoothing=1.5, activations="int8_dynamic"), "smoothing"),
    (dict(smoothing=True, activations="int8_dynamic"), "smoothing"),
    (dict(smoothing=0.5, activations="int8_dynamic", init="awq"), "smoothing"),
    (dict(mappings={"norm": ["fc"]}), "mappings"),  # no awq, no smoothing
    (dict(init="awq", mappings={"norm": "fc"}), "mappings"),
    (dict(init="awq", mappings=["norm", "fc"]), "mappings"),
])
def test_bad_calibrated_start_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ArgumentError) as err:
        QuantizationAwareTraining("int4", group_size=16, **kwargs)
    assert err.value.argument == argument and f"`{argument}" in str(err.value)


def test_calibration_batches_defaults_to_16_and_applies_only_to_a_calibrated_start():
    assert QuantizationAwareTraining("int4", group_size=16, init="gptq").calibration_batches == 16
    assert QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=4).calibration_batches == 4
    with pytest.raises(ArgumentError, match="`calibration_batches` sets how many batches init='gptq'/'awq' or"
                       " `smoothing` record before `start_step`; set one of them, or drop `calibration_batches`"):
        QuantizationAwareTraining("int4", group_size=16, calibration_batches=4)
    # A review's finding: the config of a plain callback, replaced as the package's own
    # messages advise, must build again.
    plain = QuantizationAwareTraining("int4", group_size=16)
    again = QuantizationAwareTraining(config=dataclasses.replace(plain.config, start_step=5))
    assert again.start_step == 5 and again.calibration_batches == 16


def test_a_mappings_key_that_is_not_a_name_is_blamed_as_the_key():
    with pytest.raises(ArgumentError, match=r"`mappings` keys must be module names .* got the key 1"):
        QuantizationAwareTraining("int4", group_size=16, init="awq", mappings={1: ["fc"]})


class EnabledSteps(pl.Callback):
    def __init__(self, qat):
        self.qat, self.enabled = qat, {}

    def on_before_backward(self, trainer, pl_module, loss):
        self.enabled[trainer.global_step] = all(q.enabled for q in self.qat._weight_quantizers.values())


def test_a_run_without_the_batches_before_start_step_records_its_first_batches_then_starts(tmp_path):
    # start_step=0 with 4 calibration batches and 2 batches per optimizer step: the batches
    # of steps 0 and 1 are recorded in float, fake quantization starts at step 2.
    model = llama()
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=4, targets=LINEAR_TARGETS)
    enabled = EnabledSteps(qat)
    with pytest.warns(UserWarning, match="fake quantization starts at step 2, not 0"):
        fit(model, [qat, enabled], steps=4, accumulate_grad_batches=2, loader=token_loader(batches=8))
    assert enabled.enabled == {0: False, 1: False, 2: True, 3: True}
    assert qat._calibration.calibration.statistics.batches == 4  # what the start was computed from

    # A float checkpoint fine-tuned with QAT from its last step: the window before it was
    # never recorded, so the first step of the fine-tuning is recorded instead.
    checkpoint = tmp_path / "float.ckpt"
    trainer = make_trainer(max_steps=3)
    trainer.fit(llama(), token_loader())
    trainer.save_checkpoint(checkpoint)
    qat = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=1, start_step=3,
                                    targets=LINEAR_TARGETS)
    enabled = EnabledSteps(qat)
    make_trainer(max_steps=6, max_epochs=3, callbacks=[qat, enabled]).fit(llama(), token_loader(), ckpt_path=checkpoint)
    assert enabled.enabled == {3: False, 4: True, 5: True} and qat._calibration.applied


class TwoOptimizerLlama(TinyLlama):
    """Manual optimization stepping two optimizers a batch: Lightning's `global_step`
    advances by 2 per batch (0, 2, 4, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        first.zero_grad(), second.zero_grad()
        self.manual_backward(loss)
        first.step(), second.step()

    def configure_optimizers(self):
        embeddings = list(self.model.model.embed_tokens.parameters())
        rest = [p for p in self.parameters() if all(p is not e for e in embeddings)]
        return torch.optim.SGD(embeddings, lr=0.1), torch.optim.AdamW(rest, lr=1e-3)


def test_a_window_whose_steps_hold_fewer_batches_records_on_and_starts_after_them(seeded):
    """A new user's two optimizers stepped per batch: the one-step window before
    `start_step=2` was skipped over and the start failed, blaming the layers' forward
    ("received no input in the 0 calibration batch(es)"). Now it records the batches of
    steps 0 and 2, warns, and starts at step 4 from GPTQ of exactly those two batches."""
    torch.manual_seed(0)
    model = TwoOptimizerLlama()
    layers = names(model, LINEAR_TARGETS)
    recorder = Recorder(layers, step=4)
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=2, start_step=2,
                                    targets=LINEAR_TARGETS)
    enabled = EnabledSteps(qat)
    with pytest.warns(UserWarning, match=r"init='gptq' recorded 1 of its 2 calibration batch\(es\) by step 2:"
                                         r" the window's optimizer steps held fewer batches \(manual optimization"):
        fit(model, [qat, recorder, enabled], steps=8)
    assert enabled.enabled == {0: False, 2: False, 4: True, 6: True}
    assert qat._calibration.calibration.statistics.batches == 2
    for name in layers:
        expected, _, _ = gptq_quantize(recorder.before[name].float(), hessian(recorder.inputs[name][:2]), SPEC)
        assert torch.equal(recorder.effective[name], expected), name


def test_gptq_names_layers_that_are_not_linear_or_conv2d_with_the_other_callbacks_problems(seeded):
    """Before training, in the one error that names every callback's problems (a pruning
    setting's too), and `on_incompatible="skip"` leaves them out."""
    qat = QuantizationAwareTraining("int8", init="gptq", calibration_batches=1, start_step=1)
    pruning = MagnitudePruning(pattern="2:8", targets=["fc2", "conv"])  # conv: 4 inputs x 3 taps, not blocks of 8
    with pytest.raises(IncompatibleSettings, match=r"(?s)2 problems.*MagnitudePruning\(pattern='2:8'\) cannot prune.*"
                       r"QuantizationAwareTraining\(init='gptq'\) cannot quantize layer 'conv'.*'conv' is an nn.Conv1d"):
        fit(TinyRegressor(), [pruning, qat], steps=2, loader=tiny_loader())
    qat = QuantizationAwareTraining("int8", init="gptq", calibration_batches=1, start_step=1, on_incompatible="skip")
    with pytest.warns(UserWarning, match=r"'conv' is an nn.Conv1d"):
        fit(TinyRegressor(), [qat], steps=2, loader=tiny_loader())
    assert sorted(qat.layer_specs) == ["fc1", "fc2"]


class Offset(nn.Module):
    """A "norm" whose output is x * (1 + weight): Gemma's RMSNorm convention."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x * (1 + self.weight)


class OffsetModel(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.norm = Offset(32)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(self.norm(torch.relu(self.fc1(h))))


def smoothing_on_offset_norm():
    return QuantizationAwareTraining("int8", activations="int8_dynamic", smoothing=0.5, calibration_batches=1,
                                     start_step=1, targets=["fc2"], mappings={"norm": ["fc2"]})


def test_a_norm_that_does_not_scale_with_its_weight_is_refused_at_setup_and_nothing_is_attached(seeded):
    model = OffsetModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'norm' \(Offset\) by dividing its weight, but its output does not scale"):
        fit(model, [smoothing_on_offset_norm()], steps=2, loader=tiny_loader())
    assert not any(is_transformed(m) for m in model.modules())  # no QAT stage left behind
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_fold_that_fails_at_start_is_undone_and_leaves_the_model_in_float(seeded, monkeypatch):
    # Past the setup probe (patched out here), the start checks the fold on recorded inputs.
    import lightning_compress.quant.calibrated_start as calibrated_start

    monkeypatch.setattr(calibrated_start, "_check_norm_divides", lambda *args: None)
    monkeypatch.setattr(calibrated_start.FoldCheck, "verify", lambda *args: None)  # it would refuse first, unchanged
    model = OffsetModel()
    recorder = Recorder([], step=1)
    qat = smoothing_on_offset_norm()
    with pytest.raises(ValueError, match=r"'norm' \(Offset\) did not divide its output"):
        fit(model, [qat, recorder], steps=2, loader=tiny_loader())
    for key, value in recorder.state.items():  # as trained up to the start step
        assert torch.equal(model.state_dict()[key], value.cpu()), key
    assert not any(q.enabled for q in qat._weight_quantizers.values())


def test_tied_weights_are_refused_by_name(seeded):
    model = TinyLlama()
    model.model.config.tie_word_embeddings = True
    model.model.tie_weights()
    assert model.model.lm_head.weight is model.model.model.embed_tokens.weight
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=1, start_step=1,
                                    targets=[nn.Linear])
    with pytest.raises(ValueError, match=r"'model.lm_head' in place, but it is tied.*exclude=\['lm_head'\]"):
        fit(model, [qat], steps=2)


def test_a_model_left_in_eval_mode_still_records_its_training_forwards(seeded):
    # Lightning keeps submodules in the mode they were built in: a transformers model
    # loaded with from_pretrained is in eval mode.
    model = llama()
    model.model.eval()
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=2, start_step=2,
                                    targets=LINEAR_TARGETS)
    fit(model, [qat], steps=3)
    assert qat._calibration.applied and set(qat._calibration.calibration.statistics.hessians) == set(qat._layers)


def test_awq_beside_a_second_callback_that_quantizes_the_layers_it_folds_into(seeded):
    # AWQ scales o_proj and down_proj, folding into v_proj and up_proj, which another QAT
    # callback quantizes symmetrically from the same step: the fold is checked in float.
    model = llama()
    awq = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=1, start_step=1,
                                    targets=["o_proj", "down_proj"], name="awq")
    rest = QuantizationAwareTraining("int4", group_size=16, start_step=1,
                                     targets=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], name="rest")
    fit(model, [rest, awq], steps=2)
    assert awq._calibration.applied


def test_a_calibrated_start_the_run_never_reaches_is_warned_about(seeded):
    qat = QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=16, targets=LINEAR_TARGETS)
    with pytest.warns(UserWarning, match=r"would start fake quantization at step 16.*this run ends at step 4"):
        fit(llama(), [qat], steps=4)
    assert not qat._calibration.applied


def test_a_recipe_with_a_calibrated_start_and_wanda_trains_and_names_bad_keys(tmp_path, seeded):
    from lightning_compress import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "pruning:\n  final_sparsity: 0.5\n  score: wanda\n  start_step: 1\n  end_step: 3\n"
        "  targets: [q_proj, up_proj]\n"
        "qat:\n  weights: int4\n  group_size: 16\n  init: awq\n  calibration_batches: 2\n  start_step: 2\n"
        "  targets: [q_proj, k_proj, v_proj, gate_proj, up_proj]\n"
    )
    pruning, qat, record = load_recipe(path).callbacks()
    assert qat.init == "awq" and pruning.score == "wanda"
    model = llama()
    fit(model, [pruning, qat, record], steps=4)
    assert qat._calibration.applied
    q = model.model.model.layers[0].self_attn.q_proj
    assert (q.weight == 0).float().mean() >= 0.5  # AWQ's column scaling kept the pruned weights at zero
    with pytest.raises(ValueError, match=r"qat\.smoothing"):
        load_recipe({"qat": {"weights": "int8", "smoothing": 0.5}}).callbacks()


class AttentionRegressor(TinyRegressor):
    """An nn.MultiheadAttention computes its output projection without calling it."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        h, _ = self.attn(x.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2))
        return super().forward(h.transpose(1, 2))


def test_multihead_attention_out_proj_is_refused_at_setup_naming_the_exclude(seeded):
    # Excluding nn.MultiheadAttention by type leaves its out_proj (a Linear subclass)
    # targeted; GPTQ used to record nothing for it and fail only at start_step, naming
    # the wrong fix (a new user's trial on lightning.pytorch.demos.Transformer).
    model = AttentionRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat = QuantizationAwareTraining("int4", group_size=4, init="gptq", calibration_batches=1, start_step=1,
                                    exclude=[nn.MultiheadAttention, "conv"])
    with pytest.raises(ValueError, match=r"(?s)'attn.out_proj' is an nn.MultiheadAttention's out_proj, whose weight the"
                                         r" attention reads without calling it.*exclude=\['attn.out_proj'\]"):
        fit(model, [qat], steps=2, loader=tiny_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fit(model, [QuantizationAwareTraining("int4", group_size=4, init="gptq", calibration_batches=1, start_step=1,
                                          exclude=[nn.MultiheadAttention, "conv", "*out_proj"])],
        steps=2, loader=tiny_loader())


def test_an_out_proj_replaced_by_a_plain_linear_is_known_by_where_it_sits(seeded):
    """The setup check knows an out_proj by its class; the calibrated start's own check, by
    the attention layer that holds it: a plain nn.Linear put there is still refused."""
    model = AttentionRegressor()
    model.attn.out_proj = nn.Linear(model.attn.embed_dim, model.attn.embed_dim)
    qat = QuantizationAwareTraining("int4", group_size=4, init="gptq", calibration_batches=1, start_step=1,
                                    exclude=[nn.MultiheadAttention, "conv"])
    with pytest.raises(ValueError, match=r"'attn.out_proj' is an nn.MultiheadAttention's out_proj, whose weight the"
                                         r" attention reads without calling it"):
        fit(model, [qat], steps=2, loader=tiny_loader())


class FunctionalRegressor(TinyRegressor):
    """fc2's weight is used without calling fc2."""

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return F.linear(torch.relu(self.fc1(h)), self.fc2.weight, self.fc2.bias)


def test_a_layer_whose_forward_is_never_called_is_named_at_the_start(seeded):
    qat = QuantizationAwareTraining("int4", group_size=4, init="gptq", calibration_batches=1, start_step=1,
                                    targets=["fc1", "fc2"])
    with pytest.raises(ValueError, match=r"\['fc2'\] received no input in the 1 calibration batch.*Exclude them"):
        fit(FunctionalRegressor(), [qat], steps=2, loader=tiny_loader())
    # A mapping's statistics are its first balance layer's inputs: that layer is named.
    smoothing = QuantizationAwareTraining("int8", activations="int8_dynamic", smoothing=0.5, calibration_batches=1,
                                          start_step=1, targets=["fc2"], mappings={"fc1": ["fc2"]})
    with pytest.raises(ValueError, match=r"\['fc2'\] received no input .* mappings they belong to .*"
                                         r"Exclude \['fc2'\]"):
        fit(FunctionalRegressor(), [smoothing], steps=2, loader=tiny_loader())



def test_a_second_fit_with_the_same_gptq_settings_goes_on_from_the_trained_grid(seeded):
    """The new callback took the quantizers over but built its calibrated start again:
    GPTQ ran a second time on the trained weights, replacing the grid they trained on."""
    model = llama()
    layers = names(model, LINEAR_TARGETS)

    def qat():
        return QuantizationAwareTraining("int4", group_size=16, init="gptq", calibration_batches=1, start_step=1,
                                         targets=LINEAR_TARGETS)

    fit(model, [qat()], steps=3)
    trained = {name: quantized_weights(model)[name].scale.clone() for name in layers}
    second = qat()
    fit(model, [second], steps=3)
    assert second._calibration.applied
    assert all(torch.equal(quantized_weights(model)[name].scale, trained[name]) for name in layers)
