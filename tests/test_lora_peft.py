"""PEFT's adapter format, checked against the real `peft` package (and `transformers`)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402  (a test dependency: the real package, never skipped)
import transformers  # noqa: E402

from lightning_compress import AdapterFormatError, LoRA, LoRAConfig, load_adapters, save_adapters  # noqa: E402
from lightning_compress.core.validate import ArgumentError  # noqa: E402
from lightning_compress.lora import inject_adapters  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402
from tests.test_lora import Mixed, _perturb_adapters  # noqa: E402


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


class BertClassifier(LightningModule):
    """An unchanged-looking user module: a transformers model in ``self.model`` plus a head."""

    def __init__(self):
        super().__init__()
        self.model = tiny_bert()
        self.head = torch.nn.Linear(32, 2)

    def forward(self, ids):
        return self.head(self.model(input_ids=ids).last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return F.cross_entropy(self(ids), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def bert_loader():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (32, 12), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids[:, 1] % 2), batch_size=8)


def test_adapters_trained_by_the_callback_load_in_peft_with_equal_outputs(tmp_path, seeded):
    module = BertClassifier()
    base_state = {k: v.clone() for k, v in module.model.state_dict().items()}
    lora = LoRA(r=4, lora_alpha=8, target_modules=["query", "value"], peft_root="model", adapter_dir=tmp_path)
    make_trainer(max_epochs=2, callbacks=[lora]).fit(module, bert_loader())
    ids = bert_loader().dataset.tensors[0]
    module.eval()
    ours = module.model(input_ids=ids).last_hidden_state

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in saved
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)

    base = tiny_bert()
    base.load_state_dict(base_state)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(theirs(input_ids=ids).last_hidden_state, ours, rtol=1e-5, atol=1e-5)


def test_adapters_saved_by_peft_load_into_a_plain_model_and_into_the_callback(tmp_path, seeded):
    base_state = tiny_bert().state_dict()
    peft_model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "key"], use_rslora=True)
    )
    _perturb_adapters(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    ids = bert_loader().dataset.tensors[0]
    expected = peft_model.eval()(input_ids=ids).last_hidden_state

    plain = tiny_bert()
    plain.load_state_dict(base_state)
    config = load_adapters(plain, tmp_path)
    assert (config.r, config.lora_alpha, config.use_rslora) == (2, 6, True)
    torch.testing.assert_close(plain(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)

    # Into the callback, to continue training from them.
    module = BertClassifier()
    module.model.load_state_dict(base_state)
    lora = LoRA(r=2, lora_alpha=6, use_rslora=True, target_modules=["query", "key"], peft_root="model")
    lora.load_adapters(tmp_path)
    make_trainer(max_epochs=1, limit_train_batches=0, callbacks=[lora]).fit(module, bert_loader())
    torch.testing.assert_close(module.model(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


class SequenceClassifier(LightningModule):
    """A transformers ``BertForSequenceClassification`` (a new ``classifier`` head) in ``self.model``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.model = transformers.BertForSequenceClassification(config)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_default_targets_with_a_head_in_modules_to_save_train_and_load_in_peft(tmp_path, seeded):
    """Default targets + ``modules_to_save=["classifier"]``: every Linear but the head gets an
    adapter, the head trains fully, and PEFT loads the result with equal logits."""
    module = SequenceClassifier()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    lora = LoRA(r=4, lora_alpha=8, modules_to_save=["classifier"], peft_root="model", adapter_dir=tmp_path)
    make_trainer(max_epochs=1, callbacks=[lora]).fit(module, bert_loader())
    linear = [f"model.{n}" for n, m in SequenceClassifier().model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(lora.adapters) == sorted(n for n in linear if n != "model.classifier")
    assert len(lora.adapters) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer; the pooler
    assert not torch.equal(module.model.classifier.weight, initial["classifier.weight"])  # trained fully
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and "classifier" not in config["target_modules"]

    ids = bert_loader().dataset.tensors[0]
    module.eval()
    ours = module.model(input_ids=ids).logits
    base = SequenceClassifier().model
    base.load_state_dict(initial)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_embedding_conv_and_modules_to_save_round_trip_both_ways(tmp_path, seeded):
    model = Mixed()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoRAConfig(r=3, lora_alpha=6, target_modules=["emb", "conv", "fc"], modules_to_save=["head"])
    inject_adapters(model, config)
    _perturb_adapters(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ids = torch.randint(0, 20, (4, 10))
    expected = model(ids)
    save_adapters(model, tmp_path / "ours", config)

    fresh = Mixed()
    fresh.load_state_dict(state)
    theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(ids), expected, rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(str(tmp_path / "theirs"))

    again = Mixed()
    again.load_state_dict(state)
    load_adapters(again, tmp_path / "theirs")
    torch.testing.assert_close(again(ids), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad adapter files
def _saved(tmp_path):
    model = Mixed()
    config = LoRAConfig(r=2, target_modules=["fc"])
    inject_adapters(model, config)
    save_adapters(model, tmp_path, config)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: (p / "adapter_config.json").unlink(), r"adapter_config.json: no such file"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors: no such file"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), r"adapter_config.json: not valid JSON"),
        (lambda p: _edit_config(p, peft_type="IA3"), r"`peft_type` is 'IA3'; only LoRA adapters"),
        (lambda p: _edit_config(p, use_dora=True), r"`use_dora`=True is not supported"),
        (lambda p: _edit_config(p, r=0), r"adapter_config.json: `r` \(the adapter rank\) must be a positive int"),
        (lambda p: _edit_config(p, r=3), r"lora_A of layer 'fc' has shape \(2, 16\), but a rank-3 adapter .* needs \(3, 16\)"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 40), r"not a readable safetensors file"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:-20]),
            r"not a readable safetensors file",
        ),
        (
            lambda p: save_file({"base_model.model.fcc.lora_A.weight": torch.zeros(2, 16), "base_model.model.fcc.lora_B.weight": torch.zeros(16, 2)}, str(p / "adapter_model.safetensors")),
            r"the model has no module 'fcc'. Close names: fc",
        ),
        (
            lambda p: save_file({"base_model.model.fc.lora_A.weight": torch.zeros(2, 16)}, str(p / "adapter_model.safetensors")),
            r"layer 'fc' has no lora_B tensor",
        ),
        (lambda p: save_file({"fc.lora_A.weight": torch.zeros(2, 16)}, str(p / "adapter_model.safetensors")), "not a PEFT adapter file"),
    ],
)
def test_bad_adapter_directories_raise_our_error_and_leave_the_model_alone(tmp_path, corrupt, message):
    directory = _saved(tmp_path)
    corrupt(directory)
    model = Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFormatError, match=message):
        load_adapters(model, directory)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_callback_refuses_adapters_of_another_rank(tmp_path):
    directory = _saved(tmp_path)
    with pytest.raises(ValueError, match="holds adapters with r=2, .* this callback has r=8"):
        LoRA(r=8, target_modules=["fc"]).load_adapters(directory)


def test_saving_needs_adapters():
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_adapters(Mixed(), "unused", LoRAConfig())


@pytest.mark.parametrize(
    "options, argument, message",
    [
        (dict(peft_root="mdl"), "peft_root", r"`peft_root`='mdl' is no submodule of BertClassifier. Close names: model"),
        (dict(peft_root="model."), "peft_root", r"`peft_root`='model.' is no submodule"),
        (dict(peft_root="model", target_modules=["query", "head"], r=2), "peft_root",
         r"adapters on \['head'\] lie outside `peft_root`='model'"),
        (dict(peft_root="model", modules_to_save=["head"]), "modules_to_save",
         r"`modules_to_save` pattern 'head' matches no module.*inside `peft_root`='model', where PEFT looks for them"),
    ],
)
def test_a_peft_layout_that_cannot_be_written_is_refused_before_training(tmp_path, options, argument, message):
    # A new user's trial: these failed in on_fit_end, after the whole run, with no adapters
    # written (a typo gave a raw AttributeError).
    module = BertClassifier()
    options = {"r": 2, "target_modules": ["query"], **options}
    trainer = make_trainer(max_epochs=1, callbacks=[LoRA(**options, adapter_dir=tmp_path / "adapter")])
    with pytest.raises(ArgumentError, match=message) as caught:
        trainer.fit(module, bert_loader())
    assert caught.value.argument == argument and trainer.global_step == 0
    assert not (tmp_path / "adapter").exists()
