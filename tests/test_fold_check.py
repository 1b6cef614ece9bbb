"""AWQ/SmoothQuant folds that would change the model are refused at the start
(lightning_compress.quant.fold_check), on real transformers blocks under a real Trainer."""

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import nn

from lightning_compress import QuantizationAwareTraining
from lightning_compress.quant.calibrated_start import CalibrationStatistics
from lightning_compress.quant.fold_check import FOLD_TOLERANCE, FoldCheck, fold_deviation
from tests.conftest import make_trainer

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


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
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


class Block(nn.Module):
    """norm -> (fc, and a leak of the norm's output into the result scaled by `leak`)."""

    def __init__(self, leak):
        super().__init__()
        self.norm, self.fc, self.head, self.leak = nn.LayerNorm(6), nn.Linear(6, 6), nn.Linear(6, 3), leak

    def forward(self, x):
        y = self.norm(x)
        return self.head(torch.tanh(self.fc(y)) + self.leak * y)


def loss_of(block, x, target):
    return nn.functional.cross_entropy(block(x).reshape(-1, 3), target.reshape(-1))


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_the_recorded_sums_give_the_derivative_of_the_loss_along_the_fold(leak):
    """Reference: the loss with the fold applied as (1 + εr), by central differences."""
    torch.manual_seed(0)
    block = Block(leak).double()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5), block.norm.bias.uniform_(-0.5, 0.5)
    x, target = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5, 4))
    sums = {}
    check = FoldCheck(block, {"norm": ["fc"]}, lambda: sums)
    check.attach()
    loss_of(block, x, target).backward()
    check.detach()
    a, b, scale = sums["norm"]
    r = torch.randn(6, dtype=torch.float64)

    def folded_loss(eps):
        trial = Block(leak).double()
        trial.load_state_dict(block.state_dict())
        with torch.no_grad():
            trial.norm.weight.mul_(1 + eps * r), trial.norm.bias.mul_(1 + eps * r)
            trial.fc.weight.div_(1 + eps * r)
        return float(loss_of(trial, x, target))

    eps = 1e-5
    derivative = (folded_loss(eps) - folded_loss(-eps)) / (2 * eps)
    size = float(r.abs() @ scale.double())  # the sums are float32: their round-off is relative to this
    assert derivative == pytest.approx(float(r @ (a.double() - b.double())), rel=1e-4, abs=1e-6 * size)
    deviation, _ = fold_deviation(sums["norm"])
    if leak == 0.0:
        assert deviation < 1e-5  # tanh after fc: the fold keeps the loss
    else:
        assert deviation > FOLD_TOLERANCE
    assert bool((scale >= a.abs() - 1e-6).all())


def test_nothing_measured_is_no_verdict():
    assert fold_deviation(torch.zeros(3, 4)) is None
    assert fold_deviation(torch.tensor([[1.0], [0.0], [float("inf")]])) is None


def test_statistics_from_a_checkpoint_without_fold_sums_load():
    stats = CalibrationStatistics()
    stats.load_state_dict({"batches": 3, "hessians": {}, "rows": {}, "absmax": {"n": torch.ones(2)}, "probes": {}})
    assert stats.batches == 3 and stats.folds == {} and torch.equal(stats.absmax["n"], torch.ones(2))
