"""AWQ/SmoothQuant folds that would change the model are refused at the start
(lightning_compress.quant.fold_check), on real transformers blocks under a real Trainer."""

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import nn

from lightning_compress import LoRA, QuantizationAwareTraining
from lightning_compress.quant.calibrated_start import CalibrationStatistics
from lightning_compress.quant.fold_check import FOLD_TOLERANCE, FoldCheck, fold_deviation
from tests.conftest import StopAfterEpoch, make_trainer

VOCAB = 64


class HFModule(pl.LightningModule):
    """A transformers model with labels in the batch, trained at lr=0 so every weight the
    start did not fold stays as built."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def bert(dropout=0.1):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout)
    return HFModule(transformers.BertForSequenceClassification(config))


def phi():
    torch.manual_seed(0)
    config = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=32)
    return HFModule(transformers.PhiForCausalLM(config))


def loader(causal=False, batches=4):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batches * 4, 12), generator=generator)
    labels = ids if causal else torch.randint(0, 2, (batches * 4,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=4)


def smoothing(mappings=None, targets=None):
    return QuantizationAwareTraining("int8", activations="int8_dynamic", smoothing=0.5, calibration_batches=2,
                                     start_step=2, mappings=mappings, targets=targets)


LAYER = "encoder.layer.0."


@pytest.mark.parametrize("mappings, why", [
    # A new user's trial: sizes match, the query's output never reaches the FFN (logits moved 25%).
    ({LAYER + "attention.self.query": [LAYER + "intermediate.dense"]}, "unrelated layers"),
    # A GELU lies between them (logits moved 0.2%).
    ({LAYER + "intermediate.dense": [LAYER + "output.dense"]}, "GELU"),
    # Post-norm: the LayerNorm's output is also the residual stream.
    ({LAYER + "attention.output.LayerNorm": [LAYER + "intermediate.dense"]}, "residual"),
])
def test_a_fold_that_changes_the_model_is_refused_and_the_model_left_as_trained(mappings, why):
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (smooth, balance), = mappings.items()
    qat = smoothing(mappings, targets=balance)
    trainer = make_trainer(max_steps=4, callbacks=[qat])
    with pytest.raises(ValueError, match=rf"would fold scales into 'model\.bert\.{smooth}' and the input columns of"
                       rf" \['model\.bert\.{balance[0]}'\], but that changes what the model computes.*off by \d+%"):
        trainer.fit(model, loader())
    assert trainer.global_step == 2  # the calibration steps ran; the start refused
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_built_in_bert_mapping_folds_and_keeps_the_float_model():
    model = bert()
    probe = next(iter(loader()))[0]
    original = bert().model.eval()
    qat = QuantizationAwareTraining("int8", activations="int8_dynamic", smoothing=0.5, calibration_batches=2,
                                    start_step=2, targets=["attention.output.dense"])
    make_trainer(max_steps=3, callbacks=[qat]).fit(model, loader())
    assert qat._calibration.applied
    folded = bert()  # the raw (float) weights, folded, in a plain model
    folded.load_state_dict(model.state_dict())
    value = "bert.encoder.layer.0.attention.self.value.weight"
    assert not torch.equal(folded.model.state_dict()[value], original.state_dict()[value])
    with torch.no_grad():
        assert torch.allclose(folded.model.eval()(input_ids=probe).logits, original(input_ids=probe).logits,
                              rtol=1e-4, atol=1e-6)


def test_phi_parallel_blocks_refuse_the_built_in_norm_mapping():
    # Phi's input_layernorm feeds the attention *and* the MLP: the built-in LLaMA rule
    # (input_layernorm -> q/k/v_proj) matches by name, and folding into it would change
    # the MLP's input. Before the check, AWQ did so in silence.
    qat = QuantizationAwareTraining("int4", group_size=16, init="awq", calibration_batches=2, start_step=2,
                                    targets=["q_proj", "k_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"into 'model\.model\.layers\.0\.input_layernorm' and the input columns of"
                       r" \['model\.model\.layers\.0\.self_attn\.q_proj', .*changes what the model computes"):
        make_trainer(max_steps=4, callbacks=[qat]).fit(phi(), loader(causal=True))


def test_a_fold_into_a_layer_with_a_lora_adapter_is_refused():
    # A review's finding: the fold scales W, not W + B·A, so it changed the model.
    model = bert()
    lora = LoRA(r=2, target_modules=["intermediate.dense"])
    qat = smoothing({LAYER + "attention.output.LayerNorm": [LAYER + "intermediate.dense"]},
                    targets=[LAYER + "intermediate.dense"])
    with pytest.raises(ValueError, match=r"\['model\.bert\.encoder\.layer\.0\.intermediate\.dense'\] compute with a"
                       r" LoRA adapter \(W \+ B·A\), which would not scale with W"):
        make_trainer(max_steps=4, callbacks=[lora, qat]).fit(model, loader())


def test_a_fold_into_a_smooth_linear_with_a_lora_adapter_is_refused():
    lora = LoRA(r=2, target_modules=["attention.self.value"])
    qat = smoothing(targets=["attention.output.dense"])  # the built-in value -> output.dense
    with pytest.raises(ValueError, match=r"\['model\.bert\.encoder\.layer\.0\.attention\.self\.value'\] compute with"
                       " a LoRA adapter"):
        make_trainer(max_steps=4, callbacks=[qat, lora]).fit(bert(), loader())


class Perturbed(HFModule):
    """Takes the gradient of the loss with respect to the embeddings first (an adversarial
    perturbation, as FGSM does): an extra backward pass that forms no weight gradient."""

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        embeddings = self.model.bert.embeddings.word_embeddings(ids).detach().requires_grad_()
        loss = self.model(inputs_embeds=embeddings, labels=labels).loss
        (grad,) = torch.autograd.grad(loss, embeddings)
        return self.model(inputs_embeds=embeddings + 1e-2 * grad.sign(), labels=labels).loss


def test_an_extra_backward_pass_for_the_inputs_does_not_refuse_a_fold_that_keeps_the_model():
    model = Perturbed(bert().model)
    qat = smoothing(targets=["attention.output.dense"])  # the built-in value -> output.dense
    make_trainer(max_steps=3, callbacks=[qat]).fit(model, loader())
    assert qat._calibration.applied


def test_the_measurement_resumes_inside_the_calibration_window(tmp_path, monkeypatch):
    verified = []
    real = FoldCheck.verify
    monkeypatch.setattr(FoldCheck, "verify", lambda self, totals, setting: verified.append(
        {k: v.clone() for k, v in totals.items()}) or real(self, totals, setting))

    def run(extra=(), ckpt_path=None):
        model = bert(dropout=0.0)  # Lightning does not restore the global RNG dropout draws from
        qat = QuantizationAwareTraining("int8", activations="int8_dynamic", smoothing=0.5, calibration_batches=3,
                                        start_step=3, targets=["attention.output.dense"])
        make_trainer(max_epochs=2, callbacks=[qat, *extra]).fit(model, loader(batches=2), ckpt_path=ckpt_path)

    run()
    checkpoint = tmp_path / "epoch0.ckpt"
    run([StopAfterEpoch(0, checkpoint)])  # step 2: two of the three calibration batches recorded
    state = torch.load(checkpoint, weights_only=True)["callbacks"]
    (folds,) = [s["calibration"]["calibration"]["folds"] for s in state.values() if "calibration" in s]
    assert set(folds) == {"model.bert.encoder.layer.0.attention.self.value"} and bool(folds[next(iter(folds))].any())
    run(ckpt_path=checkpoint)
    uninterrupted, resumed = verified[0], verified[-1]
    assert set(uninterrupted) == set(resumed)
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


class Block(nn.Module):
    """in -> norm -> relu(fc) -> head, with ``leak`` times the norm's output added to the
    head's input (as a residual would)."""

    def __init__(self, leak):
        super().__init__()
        self.inp, self.norm, self.fc, self.head = nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.leak = leak

    def forward(self, x):
        y = self.norm(self.inp(x))
        return self.head(torch.relu(self.fc(y)) + self.leak * y)


def block_data(samples=2048, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=generator)
    noisy = torch.rand(samples, generator=generator) < 0.3  # label noise: the loss has a true minimum
    target = torch.where(noisy, torch.randint(0, 3, (samples,), generator=generator), x[:, :3].argmax(1))
    return x, target


def measured(block, x, target, batches=8, batch_size=32):
    """The check's totals over ``batches`` batches (each attached and detached, as the
    calibration window does)."""
    totals = {}
    check = FoldCheck(block, {"norm": ["fc"]}, lambda: totals)
    for index in range(batches):
        rows = slice(index * batch_size, (index + 1) * batch_size)
        check.attach()
        nn.functional.cross_entropy(block(x[rows]), target[rows]).backward()
        block.zero_grad()
        check.detach()
    return totals["norm"]


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_each_batch_gives_the_derivatives_of_its_loss_along_the_fold(leak):
    """Reference: central differences of one batch's loss, the norm's channel j (weight
    and bias) scaled by 1 + ε (a_j), or fc's input column j (b_j)."""
    torch.manual_seed(0)
    block = Block(leak).double()
    x, target = block_data(16)
    x = x.double()
    deviation, size = measured(block, x, target, batches=1, batch_size=16)

    def loss_scaled(channel, part, eps):
        trial = Block(leak).double()
        trial.load_state_dict(block.state_dict())
        with torch.no_grad():
            tensors = (trial.norm.weight, trial.norm.bias) if part == "norm" else (trial.fc.weight[:, channel],)
            for tensor in tensors:
                if part == "norm":
                    tensor[channel] *= 1 + eps
                else:
                    tensor *= 1 + eps
        return float(nn.functional.cross_entropy(trial(x), target))

    eps = 1e-6
    for channel in range(6):
        a, b = ((loss_scaled(channel, part, eps) - loss_scaled(channel, part, -eps)) / (2 * eps)
                for part in ("norm", "fc"))
        assert float(deviation[channel]) == pytest.approx(abs(a - b), rel=1e-3, abs=1e-6)
        assert float(size[channel]) == pytest.approx(abs(a) + abs(b), rel=1e-3, abs=1e-6)
        if leak == 0.0:  # relu commutes with a positive scale: the loss is invariant
            assert abs(a - b) < 1e-6 * (abs(a) + abs(b) + 1e-3)


def test_a_fold_that_changes_the_model_is_still_found_once_the_model_is_trained():
    """A review's finding: summed over batches, a - b of such a fold goes to zero as the
    model trains to a minimum of its loss, where every direction's derivative averages
    out; compared batch by batch it does not."""
    x, target = block_data()
    deviations = {}
    for leak in (0.0, 0.5):
        torch.manual_seed(0)
        block = Block(leak)
        optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
        for step in range(300):
            rows = torch.randint(0, len(x), (256,), generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            nn.functional.cross_entropy(block(x[rows]), target[rows]).backward()
            optimizer.step()
        deviations[leak] = fold_deviation(measured(block, x, target))[0]
    assert deviations[0.0] < 1e-5 and deviations[0.5] > 5 * FOLD_TOLERANCE, deviations


def watched(leak):
    """A block, 64 samples, and a check of its norm -> fc fold recording into ``totals``."""
    block = Block(leak)
    totals = {}
    return block, block_data(64), totals, FoldCheck(block, {"norm": ["fc"]}, lambda: totals)


def one_batch(check, block, data, scale=1.0):
    """One training batch between attach and detach, as the calibration window runs it."""
    check.attach()
    (nn.functional.cross_entropy(block(data[0]), data[1]) * scale).backward()
    check.detach()
    block.zero_grad()


def test_batches_with_non_finite_gradients_are_left_out():
    block, data, totals, check = watched(0.0)
    one_batch(check, block, data, scale=float("inf"))  # a loss scaler's overflow
    assert totals == {}
    one_batch(check, block, data)
    assert fold_deviation(totals["norm"])[0] < 1e-5


def test_frozen_parameters_are_not_measured_and_say_so():
    block, data, totals, check = watched(0.5)
    block.fc.weight.requires_grad_(False)
    one_batch(check, block, data)  # frozen from the start: no hook at all
    block.fc.weight.requires_grad_(True)
    check.attach()
    block.fc.weight.requires_grad_(False)  # frozen inside the batch (a review's finding: refused as broken)
    nn.functional.cross_entropy(block(data[0]), data[1]).backward()
    check.detach()
    assert totals == {}
    with pytest.warns(UserWarning, match=r"smoothing=0\.5: could not check that folding into \['norm'\] keeps the"
                      " model's function"):
        check.verify(totals, "smoothing=0.5")


def test_hooks_go_at_each_batch_end_and_after_an_exception_in_the_window():
    block, data, totals, check = watched(0.0)
    one_batch(check, block, data)
    recorded = {k: v.clone() for k, v in totals.items()}
    nn.functional.cross_entropy(block(data[0]), data[1]).backward()  # outside a batch: not recorded
    assert torch.equal(totals["norm"], recorded["norm"])
    assert not any(p._backward_hooks for p in block.parameters())

    class FailsInTheWindow(HFModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("out of memory, say")
            return super().training_step(batch, batch_idx)

    model = FailsInTheWindow(bert().model)
    qat = smoothing(targets=["attention.output.dense"])
    with pytest.raises(RuntimeError, match="out of memory, say"):
        make_trainer(max_steps=4, callbacks=[qat]).fit(model, loader())
    assert not any(p._backward_hooks for p in model.parameters())


def test_nothing_measured_is_no_verdict():
    assert fold_deviation(torch.zeros(2, 4)) is None


def test_statistics_from_a_checkpoint_without_fold_sums_load():
    stats = CalibrationStatistics()
    stats.load_state_dict({"batches": 3, "hessians": {}, "rows": {}, "absmax": {"n": torch.ones(2)}, "probes": {}})
    assert stats.batches == 3 and stats.folds == {} and torch.equal(stats.absmax["n"], torch.ones(2))
