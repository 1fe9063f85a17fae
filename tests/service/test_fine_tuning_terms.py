"""OpenAI's hyperparameter names in our terms (api.fine_tuning.service.spec_hyperparameters):
what `"auto"` keeps, how `batch_size` splits and how `learning_rate_multiplier` scales."""

from __future__ import annotations

import pytest

from api.errors import ApiError
from api.fine_tuning.schemas import FineTuneHyperparameters
from api.fine_tuning.service import spec_hyperparameters
from warp_core.spec import Hyperparameters


def ours(**given) -> dict:
    return spec_hyperparameters(FineTuneHyperparameters(**given), "method.warp.hyperparameters")


def test_auto_keeps_the_spec_defaults():
    assert ours() == {}
    assert ours(n_epochs="auto", batch_size="auto", learning_rate_multiplier="auto") == {}
    spec = Hyperparameters.model_validate(ours())
    assert (spec.epochs, spec.batch_size * spec.grad_accum_steps, spec.learning_rate) == (
        3,
        16,
        5e-5,
    )


@pytest.mark.parametrize(
    ("examples", "micro", "accum"), [(16, 8, 2), (12, 6, 2), (4, 4, 1), (11, 1, 11), (64, 8, 8)]
)
def test_batch_size_counts_examples_per_step(examples, micro, accum):
    assert ours(batch_size=examples) == {"batch_size": micro, "grad_accum_steps": accum}


def test_batch_size_with_our_accumulation_steps():
    assert ours(batch_size=12, grad_accum_steps=3) == {"batch_size": 4, "grad_accum_steps": 3}
    with pytest.raises(ApiError) as refused:
        ours(batch_size=10, grad_accum_steps=3)
    assert refused.value.extra["fields"][0]["field"] == "method.warp.hyperparameters.batch_size"


def test_the_multiplier_scales_our_learning_rate_or_its_default():
    assert ours(learning_rate_multiplier=2) == {"learning_rate": pytest.approx(1e-4)}
    assert ours(learning_rate=1e-3, learning_rate_multiplier=0.5) == {
        "learning_rate": pytest.approx(5e-4)
    }


def test_our_names_pass_through_and_epochs_are_named_once():
    assert ours(n_epochs=2, keep_ratio=0.2, max_length=128) == {
        "epochs": 2,
        "keep_ratio": 0.2,
        "max_length": 128,
    }
    with pytest.raises(ApiError):
        ours(n_epochs=2, epochs=3)
