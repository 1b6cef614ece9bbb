"""LoRA across Trainers (a second stage, an evaluation, adapters loaded before fit), the
dtype a merge writes, and what `save_adapters` checks of its `config`."""

import os

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402  (a test dependency: the real package, never skipped)
import transformers  # noqa: E402
from lightning.pytorch import LightningModule  # noqa: E402

from lightning_compress import LoRA, LoRAConfig, load_adapters, merge_adapters, save_adapters  # noqa: E402
from lightning_compress.core.validate import ArgumentError  # noqa: E402
from lightning_compress.quant.nf4 import is_nf4  # noqa: E402
from tests.conftest import TinyRegressor, make_trainer, tiny_loader  # noqa: E402
from tests.test_lora import TINY_NF4  # noqa: E402

X = tiny_loader().dataset.tensors[0]


def _trained(**options):
    """A TinyRegressor after 2 epochs with LoRA on fc1/fc2: (model, its outputs, its adapters)."""
    model = TinyRegressor()
    make_trainer(max_epochs=2, callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"], **options)]).fit(model, tiny_loader())
    model.eval()
    with torch.no_grad():
        outputs = model(X)
    model.train()
    return model, outputs, _adapters(model)


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_a_new_lora_callback_goes_on_with_the_adapters_an_earlier_trainer_trained(seeded):
    model, trained, adapters = _trained()
    assert any(v.abs().sum() > 0 for n, v in adapters.items() if "lora_B" in n)  # trained away from B = 0
    make_trainer(callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"])]).validate(model, tiny_loader())
    with torch.no_grad():
        assert torch.equal(model(X), trained)  # not the base model: the adapters were kept, not re-made
    assert all(torch.equal(_adapters(model)[n], v) for n, v in adapters.items())

    # A second training stage starts where the first ended and trains the same adapters.
    make_trainer(max_epochs=1, callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"])]).fit(model, tiny_loader())
    moved = _adapters(model)
    assert sorted(moved) == sorted(adapters)
    assert all(not torch.equal(moved[n], v) for n, v in adapters.items() if "lora_B" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("options, message", [
    ({"r": 2, "target_modules": ["fc1", "fc2"]}, r"'fc1' has r 4, this LoRA 2"),
    ({"r": 4, "lora_alpha": 32, "target_modules": ["fc1", "fc2"]}, r"'fc2' has scaling .* 4\.0, this LoRA 8\.0"),
    ({"r": 4, "target_modules": ["fc1"]}, r"'fc2' has an adapter and is not among this LoRA's targets"),
    ({"r": 4, "target_modules": ["fc1", "fc2"], **TINY_NF4}, r"'fc1' has base 'float', this LoRA 'nf4'"),
])
def test_adapters_that_do_not_fit_a_new_lora_are_refused_and_left_as_they_were(seeded, options, message):
    model, trained, adapters = _trained()
    with pytest.raises(ValueError, match=message + r".*merge_adapters\(model\)"):
        make_trainer(callbacks=[LoRA(**options)]).validate(model, tiny_loader())
    assert all(torch.equal(_adapters(model)[n], v) for n, v in adapters.items())
    assert not is_nf4(model.fc1.weight)
    with torch.no_grad():
        assert torch.equal(model(X), trained)


def test_after_a_merge_a_new_lora_trains_new_adapters_on_the_merged_weights(seeded):
    model, trained, _ = _trained()
    merge_adapters(model)
    make_trainer(callbacks=[LoRA(r=2, target_modules=["fc1"])]).validate(model, tiny_loader())
    assert model.fc1.lora_A.shape == (2, 64) and torch.count_nonzero(model.fc1.lora_B) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(X), trained, rtol=1e-5, atol=1e-6)


def test_adapters_loaded_before_fit_are_the_ones_the_callback_trains(seeded, tmp_path):
    source, trained, adapters = _trained()
    save_adapters(source, tmp_path, LoRAConfig(r=4, target_modules=["fc1", "fc2"]))
    model = TinyRegressor()
    model.load_state_dict({k: v for k, v in source.state_dict().items() if "lora_" not in k})
    load_adapters(model, tmp_path)
    seen = {}

    class Record(LoRA):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            with torch.no_grad():
                seen["out"] = pl_module(X)

    make_trainer(max_steps=1, callbacks=[Record(r=4, target_modules=["fc1", "fc2"])]).fit(model, tiny_loader())
    assert torch.equal(seen["out"], trained)  # the loaded adapters, not new ones at B = 0


def test_two_lora_callbacks_on_one_layer_are_refused_naming_it(seeded):
    with pytest.raises(ValueError, match=r"'fc1' already hold an adapter of another LoRA callback in this Trainer"):
        make_trainer(callbacks=[LoRA(r=4, target_modules=["fc1"], name="a"),
                                LoRA(r=2, target_modules=["fc1", "fc2"], name="b")]).fit(
            TinyRegressor(), tiny_loader())


def test_qlora_merged_under_bf16_true_computes_in_bfloat16(seeded):
    model = TinyRegressor()
    probe = {}

    class Probe(LoRA):
        def on_fit_end(self, trainer, pl_module):
            with torch.no_grad():
                probe["out"] = pl_module(X.bfloat16())  # before the merge
            super().on_fit_end(trainer, pl_module)

    lora = Probe(r=4, target_modules=["fc1", "fc2"], merge_on_fit_end=True, **TINY_NF4)
    make_trainer(max_steps=3, precision="bf16-true", callbacks=[lora]).fit(model, tiny_loader())
    assert not is_nf4(model.fc1.weight)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # fc1/fc2 as the rest, not float32
    with torch.no_grad():
        merged = model(X.bfloat16())  # a plain forward: one dtype throughout
    torch.testing.assert_close(merged.float(), probe["out"].float(), rtol=0.05, atol=0.05)


def test_save_adapters_refuses_a_config_that_is_not_the_adapters(seeded, tmp_path):
    model, _, _ = _trained(lora_alpha=8)
    for config in (LoRAConfig(r=4, lora_alpha=32), LoRAConfig(r=8, lora_alpha=16),
                   LoRAConfig(r=4, lora_alpha=8, use_rslora=True)):
        with pytest.raises(ArgumentError, match=r"`config` .* does not describe the adapters .*'fc1' \(r=4, scaling 2\)"):
            save_adapters(model, tmp_path / "out", config)
        assert not (tmp_path / "out").exists()
    save_adapters(model, tmp_path / "out", LoRAConfig(r=4, lora_alpha=8))  # the adapters' own
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


class TiedCausalLM(LightningModule):
    def __init__(self):
        super().__init__()
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                                          tie_word_embeddings=True)
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_tied_head_in_modules_to_save_is_saved_with_its_embedding_and_peft_reproduces_it(seeded, tmp_path):
    module = TiedCausalLM()
    base_state = {k: v.clone() for k, v in module.model.state_dict().items()}
    ids = torch.randint(0, 48, (8, 10), generator=torch.Generator().manual_seed(0))
    lora = LoRA(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], peft_root="model", adapter_dir=tmp_path)
    make_trainer(max_steps=4, callbacks=[lora]).fit(module, torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids), batch_size=4))
    trained_embedding = module.model.model.embed_tokens.weight.detach()
    assert not torch.equal(trained_embedding, base_state["model.embed_tokens.weight"])  # the tie trained both
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.model.embed_tokens.weight"], trained_embedding)
    assert torch.equal(saved["base_model.model.lm_head.weight"], trained_embedding)

    module.eval()
    with torch.no_grad():
        ours = module.model(input_ids=ids).logits
        base = transformers.LlamaForCausalLM(module.model.config)
        base.load_state_dict(base_state)
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"exclude_modules": ["*"]}, r"`target_modules` selects no layer .* Check `target_modules` and `exclude_modules`"),
    ({"exclude_modules": ["fc9"]}, r"`exclude_modules` pattern 'fc9' matches no module"),
])
def test_target_errors_name_loras_own_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(callbacks=[LoRA(r=4, **options)]).fit(TinyRegressor(), tiny_loader())


def _two_loras(tmp_path=None):
    dirs = {} if tmp_path is None else {"a": dict(adapter_dir=tmp_path / "a"), "b": dict(adapter_dir=tmp_path / "b")}
    return [LoRA(r=4, target_modules=["fc1"], name="a", **dirs.get("a", {})),
            LoRA(r=2, lora_alpha=4, target_modules=["fc2"], name="b", **dirs.get("b", {}))]


def test_two_lora_callbacks_train_both_adapters_over_two_stages_and_save_their_own(seeded, tmp_path):
    model = TinyRegressor()
    make_trainer(max_epochs=1, callbacks=_two_loras(tmp_path)).fit(model, tiny_loader())
    first = _adapters(model)
    # the second callback's setup froze the first's adapters: they stayed at B = 0
    assert torch.count_nonzero(first["fc1.lora_B"]) > 0 and torch.count_nonzero(first["fc2.lora_B"]) > 0
    # each callback wrote its own adapters with its own r and alpha (one file could not hold both ranks)
    assert sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors"))) == ["base_model.model.fc1.lora_A.weight",
                                                                                  "base_model.model.fc1.lora_B.weight"]
    assert load_file(str(tmp_path / "b" / "adapter_model.safetensors"))["base_model.model.fc2.lora_A.weight"].shape == (2, 32)

    # A second stage with both callbacks again takes both over (each one's was "not among the targets" of the other).
    make_trainer(max_epochs=1, callbacks=_two_loras()).fit(model, tiny_loader())
    second = _adapters(model)
    assert sorted(second) == sorted(first)
    assert all(not torch.equal(second[n], first[n]) for n in first if "lora_B" in n)


def test_a_second_qlora_stage_with_other_nf4_blocks_is_refused(seeded):
    """The NF4 base stays as the first stage stored it: another block size would be silently
    ignored (and a later resume refused as "other base weights")."""
    model = TinyRegressor()
    make_trainer(max_steps=2, callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"], **TINY_NF4)]).fit(model, tiny_loader())
    other = {**TINY_NF4, "nf4_block_size": 16}
    with pytest.raises(ValueError, match=r"'fc1' has nf4_block_size 32, this LoRA 16"):
        make_trainer(callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"], **other)]).validate(model, tiny_loader())
    make_trainer(callbacks=[LoRA(r=4, target_modules=["fc1", "fc2"], **TINY_NF4)]).validate(model, tiny_loader())


def test_the_callbacks_merge_after_merge_adapters_says_so(seeded):
    model = TinyRegressor()
    lora = LoRA(r=4, target_modules=["fc1"])
    make_trainer(max_steps=2, callbacks=[lora]).fit(model, tiny_loader())
    merge_adapters(model)
    with pytest.raises(ValueError, match=r"this LoRA.s adapters are no longer on the model: merged already, or taken"):
        lora.merge()


def test_the_callbacks_save_adapters_says_why_it_has_none_to_save(seeded, tmp_path):
    """Before setup, after a merge, and once a later Trainer's LoRA took the adapters over
    (that one saves them): "save before merging" named the wrong cause for the last."""
    model = TinyRegressor()
    first = LoRA(r=4, target_modules=["fc1"])
    with pytest.raises(ValueError, match=r"LoRA has no adapters to save yet: save after fit \(or validate/test\)"):
        first.save_adapters(tmp_path / "early")
    make_trainer(max_steps=2, callbacks=[first]).fit(model, tiny_loader())
    second = LoRA(r=4, target_modules=["fc1"])
    make_trainer(max_steps=2, callbacks=[second]).fit(model, tiny_loader())
    with pytest.raises(ValueError, match=r"no longer on the model: merged already, or taken over by a later Trainer's"
                                         r" LoRA callback; save before merging, or with the LoRA callback that took"):
        first.save_adapters(tmp_path / "first")
    second.save_adapters(tmp_path / "second")
    assert torch.equal(load_file(str(tmp_path / "second" / "adapter_model.safetensors"))[
        "base_model.model.fc1.lora_B.weight"], model.fc1.lora_B.detach())
    second.merge()
    with pytest.raises(ValueError, match=r"the LoRA adapters were already merged \(into fc1\); save before merging$"):
        second.save_adapters(tmp_path / "after")
    assert not (tmp_path / "first").exists() and not (tmp_path / "after").exists()


def test_resuming_with_a_renamed_qlora_callback_names_the_state_no_callback_takes(seeded, tmp_path):
    """The checkpoint leaves NF4 bases out; a renamed callback did not put them back, and
    torch's "Missing key(s) ... fc1.weight" came first."""
    def loras(first="a"):
        return [LoRA(r=4, target_modules=["fc1"], name=first, **TINY_NF4), LoRA(r=2, target_modules=["fc2"], name="b")]

    pretrained = TinyRegressor().state_dict()

    def model():
        built = TinyRegressor()
        built.load_state_dict(pretrained)
        return built

    trainer = make_trainer(max_steps=2, callbacks=loras())
    trainer.fit(model(), tiny_loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match=r"the checkpoint holds state of LoRA \(\[.LoRA\{'name': 'a'\}.\]\) but no"
                                         r" callback of this Trainer takes it.*with the same `name`"):
        make_trainer(max_steps=4, callbacks=loras(first="x")).fit(model(), tiny_loader(), ckpt_path=tmp_path / "run.ckpt")
    make_trainer(max_steps=4, callbacks=loras()).fit(model(), tiny_loader(), ckpt_path=tmp_path / "run.ckpt")
