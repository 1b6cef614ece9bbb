"""What the default targets leave out by type, and pruning of tied weights: said at setup.

Found by a new-user trial: "QAT on GPT-2" quantized only its ``lm_head`` (its blocks are
transformers' ``Conv1D``) without a word, and pruning a tied ``lm_head`` pruned the input
embedding too.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.callbacks.coverage import shared_weights, uncompressed_by_type
from lightning_compress.quant.weights import QUANTIZABLE_TYPES
from tests.conftest import TinyRegressor, make_trainer, tiny_loader

VOCAB = 64


class CausalLM(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def ids_loader():
    ids = torch.randint(0, VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def fit_and_warnings(model, callbacks):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=callbacks, max_steps=1).fit(model, ids_loader())
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_targets_that_select_nothing_name_the_unsupported_layers_with_weights():
    # A new user's trial: GPT-2 with exclude=["lm_head"] said only "`targets` selects no layer".
    qat = QuantizationAwareTraining("int8", exclude=["lm_head"])
    with pytest.raises(ValueError, match=r"`targets` selects no layer of CausalLM \(supported types: .*\)\. Check"
                       r" `targets` and `exclude`\. Its other layers with weights are of types this method does not"
                       r" compress: Conv1D \('model\.transformer\.h\.0\.attn\.c_attn', 'model\.transformer\.h\.0\.attn\.c_proj',"
                       r" 'model\.transformer\.h\.0\.mlp\.c_fc', \.\.\.\): transformers' Conv1D \(GPT-2's projections\) is a"
                       r" Linear with a transposed weight, which this package does not compress yet\."):
        make_trainer(callbacks=[qat], max_steps=1).fit(CausalLM(tiny_gpt2()), ids_loader())


def test_default_targets_name_the_layers_they_leave_out_by_type():
    """GPT-2's blocks are transformers' Conv1D: QAT's default targets quantize its lm_head
    only, and say which layers (by type) they leave in float."""
    gpt2 = tiny_gpt2()
    left = uncompressed_by_type(gpt2, QUANTIZABLE_TYPES)
    conv1d = {name for name, module in gpt2.named_modules() if type(module).__name__ == "Conv1D"}
    assert set(left) == conv1d and len(conv1d) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    messages = fit_and_warnings(CausalLM(gpt2), [QuantizationAwareTraining("int8")])
    [message] = [m for m in messages if "leaves in float the layers of types it does not compress" in m]
    assert message.startswith("QuantizationAwareTraining (default targets) leaves in float")
    assert "Conv1D ('model.transformer.h.0.attn.c_attn', " in message and "(8 in all)" in message
    assert "transformers' Conv1D (GPT-2's projections)" in message


def test_a_model_of_supported_layers_gets_no_coverage_warning(seeded):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[QuantizationAwareTraining("int8"), MagnitudePruning(0.5)], max_steps=1).fit(
            TinyRegressor(), tiny_loader(batches=1))
    assert not [w for w in caught if "leaves in float" in str(w.message)]


def test_pruning_a_tied_lm_head_is_refused_and_the_shared_weight_is_found():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    llama = transformers.LlamaForCausalLM(config)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    embedding = llama.model.embed_tokens.weight.detach().clone()
    # It was a warning; then the zeros pruned the embedding after fit, which had trained it dense.
    with pytest.raises(ValueError, match=r"layer 'model.lm_head' shares its weight with 'model.model.embed_tokens.weight'"):
        fit_and_warnings(CausalLM(llama), [MagnitudePruning(0.5, start_step=0, end_step=1)])
    assert torch.equal(llama.model.embed_tokens.weight, embedding)
    # Both modules selected: the one weight is pruned for both, nothing to say.
    untied = {"model.lm_head": llama.lm_head, "model.model.embed_tokens": llama.model.embed_tokens}
    wrapped = CausalLM(llama)
    assert shared_weights(wrapped, untied) == {}
    assert shared_weights(wrapped, {"model.lm_head": llama.lm_head}) == {"model.lm_head": ["model.model.embed_tokens.weight"]}
