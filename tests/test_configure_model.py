"""Layers a LightningModule builds in ``configure_model``, which Lightning calls after the
callbacks' ``setup``: compressed as any other, or refused by name, never left out unnoticed."""

import pytest
from torch import nn

from lightning_compress import LoRA, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.core.transforms import is_transformed
from tests.conftest import TinyRegressor, make_trainer, tiny_loader


# Each refusal, for both callbacks that set up in `setup`.
PRUNING_OR_QAT = pytest.mark.parametrize("make_callback", [lambda: MagnitudePruning(0.5, start_step=0, end_step=2),
                                                           lambda: QuantizationAwareTraining("int8")],
                                         ids=["pruning", "qat"])


class HeadInConfigureModel(TinyRegressor):
    """fc2 is built in ``configure_model`` (once: Lightning calls it for every stage)."""

    def __init__(self):
        super().__init__()
        del self.fc2

    def configure_model(self):
        if not hasattr(self, "fc2"):
            self.fc2 = nn.Linear(32, 8)


class AllInInit(TinyRegressor):
    def configure_model(self):  # builds nothing: the layers of __init__ are the ones targeted
        pass


@PRUNING_OR_QAT
def test_a_targeted_layer_built_after_setup_is_refused_by_name(make_callback, seeded):
    model = HeadInConfigureModel()
    with pytest.raises(ValueError, match=r"before `configure_model` built \['fc2'\], which it also targets .*"
                                         r"build them in `__init__` .* with `exclude`"):
        make_trainer(max_steps=2, callbacks=[make_callback()]).fit(model, tiny_loader(batches=2))


class HeadReplacedInConfigureModel(TinyRegressor):
    """fc2 exists at setup and ``configure_model`` replaces it with a new module (a new
    user's LLaMA swapped its lm_head there: it trained uncompressed, silently)."""

    def configure_model(self):
        if not getattr(self, "_replaced", False):
            self.fc2, self._replaced = nn.Linear(32, 8), True


@PRUNING_OR_QAT
def test_a_targeted_layer_replaced_after_setup_is_refused_by_name(make_callback, seeded):
    with pytest.raises(ValueError, match=r"before `configure_model` replaced \['fc2'\] with new modules, which hold"
                                         r" none of its stages and would train uncompressed"):
        make_trainer(max_steps=2, callbacks=[make_callback()]).fit(HeadReplacedInConfigureModel(),
                                                                   tiny_loader(batches=2))


class AllInConfigureModel(TinyRegressor):
    """Every layer is built in ``configure_model``."""

    def __init__(self):
        super().__init__()
        del self.conv, self.fc1, self.fc2

    def configure_model(self):
        if not hasattr(self, "fc2"):
            self.conv, self.fc1, self.fc2 = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(64, 32), nn.Linear(32, 8)


@PRUNING_OR_QAT
def test_targets_built_in_configure_model_alone_are_named_as_too_late(make_callback, seeded):
    """With no targeted layer there at setup, the message only said to check `targets`."""
    with pytest.raises(ValueError, match=r"`targets` selects no layer of AllInConfigureModel .* If `configure_model`"
                                         r" builds the layers, they are not there yet when the callbacks set up: build"):
        make_trainer(max_steps=2, callbacks=[make_callback()]).fit(AllInConfigureModel(), tiny_loader(batches=2))


@pytest.mark.parametrize("argument", ["targets", "exclude"])
def test_a_name_pattern_for_a_layer_built_in_configure_model_says_why_it_matches_nothing(argument, seeded):
    """A new user's `targets=["net.2"]` on layers built in `configure_model` was told
    "Module names look like: " and an empty list."""
    with pytest.raises(ValueError, match=rf"MagnitudePruning: `{argument}` pattern 'fc1' matches no module\. The model"
                                         r" has no submodules\. If `configure_model` builds the layers, they are not"
                                         r" there yet when the callbacks set up: build them in `__init__`"):
        make_trainer(max_steps=2, callbacks=[MagnitudePruning(0.5, start_step=0, end_step=2, **{argument: ["fc1"]})]
                     ).fit(AllInConfigureModel(), tiny_loader(batches=2))


def test_layers_built_in_configure_model_get_lora_adapters(seeded):
    model = HeadInConfigureModel()
    lora = LoRA(r=2, target_modules=["fc1", "fc2"])
    make_trainer(max_steps=2, callbacks=[lora]).fit(model, tiny_loader(batches=2))
    assert set(lora.adapters) == {"fc1", "fc2"} and not model.fc2._parameters["weight"].requires_grad


def test_a_configure_model_that_builds_nothing_new_trains_and_validates(seeded):
    model = AllInInit()
    pruning = MagnitudePruning(0.5, start_step=0, end_step=2)
    trainer = make_trainer(max_steps=2, callbacks=[pruning, QuantizationAwareTraining("int8")])
    trainer.fit(model, tiny_loader(batches=2), val_dataloaders=tiny_loader(batches=1))
    trainer.validate(model, tiny_loader(batches=1))
    assert pruning.sparsity == pytest.approx(0.5, abs=0.01) and is_transformed(model.fc1)  # validate keeps masks
    assert int((model.fc1.weight == 0).sum()) > 0
    assert "configure_model" not in vars(model)  # the class's own hook again
