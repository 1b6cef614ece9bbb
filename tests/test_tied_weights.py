"""LoRA and pruning on a transformers model whose head is tied to its input embedding
(LLaMA with ``tie_word_embeddings=True``, as Llama-3.2-1B and Qwen2.5-0.5B ship). From a
new user's trial: merging wrote the head's delta through the shared weight into the
embedding (logits moved by 4e-2, silently); a QLoRA export kept ``tie_word_embeddings:
true`` though the head held its own weight, so transformers could not load it; pruning
the head zeroed half the embedding after fit, and the export did not load into the model."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from lightning_compress import CompressedExport, LoRA, MagnitudePruning, QuantizationAwareTraining, export, load_packed  # noqa: E402
from lightning_compress.core.targeting import embeddings_untied, input_and_output_embeddings  # noqa: E402
from lightning_compress.quant.spec import QuantSpec  # noqa: E402
from lightning_compress.quant.weights import round_to_nearest  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402
from tests.test_hf_export import VOCAB, relative_error, tiny_llama  # noqa: E402
from tests.test_lora import TINY_NF4  # noqa: E402


class TiedLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(tied=True).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def tokens(batches: int = 4, seed: int = 0):
    ids = torch.randint(1, VOCAB, (batches * 2, 12), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


def logits(module: TiedLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("targets", [["lm_head", "q_proj"], ["*"]], ids=["head", "head-and-embedding"])
def test_merging_an_adapter_of_a_tied_head_unties_it_and_keeps_what_the_model_computes(seeded, tmp_path, targets):
    module = TiedLM()
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    lora = LoRA(r=4, lora_alpha=8, target_modules=targets)
    make_trainer(max_steps=3, callbacks=[lora]).fit(module, tokens())
    ids = next(iter(tokens(seed=1)))[0]
    before = logits(module, ids)
    with pytest.warns(UserWarning, match=r"output embedding of LlamaForCausalLM no longer shares its input embedding"):
        lora.merge()
    assert relative_error(before, logits(module, ids)) < 1e-6  # 4e-2 away when the head's delta went into both
    assert module.model.lm_head.weight is not module.model.model.embed_tokens.weight
    assert module.model.config.tie_word_embeddings is False
    module.model.save_pretrained(tmp_path / "merged")  # and transformers keeps both weights through a save
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert relative_error(before, loaded(input_ids=ids).logits) < 1e-6


@pytest.mark.parametrize("lora, qat_exclude", [
    (dict(TINY_NF4), None),  # QLoRA: the head's NF4 base is a weight of its own
    # An unmerged adapter: the head computes with W + B·A, the embedding with W (a trial of
    # the QLoRA fix found the config still said tied: a loader following it drops the delta).
    (dict(target_modules=["lm_head", "q_proj"]), ["lm_head"]),
], ids=["qlora", "unmerged-adapter"])
def test_an_export_of_a_tied_model_whose_head_computes_apart_is_written_untied(seeded, tmp_path, lora, qat_exclude):
    module = TiedLM()
    callbacks = [LoRA(r=4, lora_alpha=8, **lora),
                 QuantizationAwareTraining("int4", group_size=32, start_step=1, exclude=qat_exclude),
                 CompressedExport(tmp_path / "hf", module="model")]
    make_trainer(max_steps=3, callbacks=callbacks).fit(module, tokens())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = next(iter(tokens(seed=1)))[0]
    with torch.no_grad():
        assert relative_error(logits(module, ids), loaded(input_ids=ids).logits) < 1e-5


def test_pruning_a_tied_head_is_refused_before_training_and_excluding_it_loads_back(seeded, tmp_path):
    module = TiedLM()
    embedding = module.model.model.embed_tokens.weight.detach().clone()
    trainer = make_trainer(max_steps=3, callbacks=[MagnitudePruning(0.5, start_step=1, end_step=2, update_every=1)])
    with pytest.raises(ValueError, match=r"MagnitudePruning\(targets=None\) cannot prune layer 'model.lm_head' \(Linear\):"
                                         r" layer 'model.lm_head' shares its weight with 'model.model.embed_tokens.weight'"
                                         r".*\nFix: add exclude=\['model.lm_head'\] to MagnitudePruning"):
        trainer.fit(module, tokens())
    assert trainer.global_step == 0 and torch.equal(module.model.model.embed_tokens.weight, embedding)

    skipping = MagnitudePruning(0.5, start_step=1, end_step=2, update_every=1, on_incompatible="skip")
    with pytest.warns(UserWarning, match=r"'model.lm_head'.*shares its weight"):
        make_trainer(max_steps=3, callbacks=[skipping]).fit(TiedLM(), tokens())

    pruning = MagnitudePruning(0.5, start_step=1, end_step=2, update_every=1, exclude=["lm_head"])
    make_trainer(max_steps=3, callbacks=[pruning, CompressedExport(tmp_path / "out", module="model")]).fit(
        module, tokens())
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight  # still tied, never pruned
    assert (module.model.model.layers[0].mlp.up_proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    loaded = load_packed(tmp_path / "out", tiny_llama(tied=True)).eval()
    ids = next(iter(tokens(seed=1)))[0]
    with torch.no_grad():
        assert torch.equal(logits(module, ids), loaded(input_ids=ids).logits)


def test_the_export_report_weighs_a_tied_weight_once(tmp_path):
    # A new user's trial: 3.83x smaller claimed where the float32 model is 2.93x the file.
    model = tiny_llama(tied=True)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    float32 = sum(t.numel() * 4 for t in unique.values())
    round_to_nearest(model, QuantSpec(4, "group", 32), targets=[torch.nn.Linear])
    report = export(model, tmp_path / "out", inputs=[{"input_ids": next(iter(tokens()))[0]}])
    assert report.float32_bytes == float32
    assert report.compression_ratio == float32 / (tmp_path / "out" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("base", ["float", "nf4"])
@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-first", "pruning-first"])
def test_pruning_a_tied_head_with_an_adapter_on_it_trains_and_leaves_the_embedding(seeded, base, lora_first):
    # A review: the mask acts on W + B·A there and never writes W, so refusing it was wrong,
    # and with an NF4 base it depended on the order of the callbacks.
    module = TiedLM()
    embedding = module.model.model.embed_tokens.weight.detach().clone()
    lora = LoRA(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], **(TINY_NF4 if base == "nf4" else {}))
    pruning = MagnitudePruning(0.5, start_step=1, end_step=2, update_every=1, targets=["lm_head", "up_proj"])
    make_trainer(max_steps=3, callbacks=[lora, pruning] if lora_first else [pruning, lora]).fit(module, tokens())
    assert torch.equal(module.model.model.embed_tokens.weight, embedding)
    assert (module.model.lm_head.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_input_and_output_embeddings_of_a_model_without_them_is_none():
    class Partial(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError  # transformers' base class, for a model that does not define it

        def get_output_embeddings(self):
            return None

    assert input_and_output_embeddings(Partial()) is None and not embeddings_untied(Partial())
    assert input_and_output_embeddings(torch.nn.Linear(2, 2)) is None
    model = tiny_llama(tied=True)
    assert input_and_output_embeddings(model) == (model.model.embed_tokens, model.lm_head)
