import pytest
from torch import nn

from lightning_compress import KnowledgeDistillation, MagnitudePruning, QuantizationAwareTraining


@pytest.mark.parametrize(
    "callback",
    [MagnitudePruning(0.5), QuantizationAwareTraining("int8"), KnowledgeDistillation(teacher=nn.Linear(2, 2))],
    ids=lambda c: type(c).__name__,
)
def test_state_from_another_layout_version_is_refused(callback):
    name = type(callback).__name__
    with pytest.raises(ValueError, match=f"{name} state version 99 is not 1; the checkpoint comes from another"):
        callback.load_state_dict({"version": 99})
