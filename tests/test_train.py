import pytest
import torch

from certaudit.errors import InputError
from certaudit.models import build_model
from certaudit.train import TrainConfig, accuracy, train


def test_training_improves_accuracy_on_digits_within_seconds(digits):
    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(0)
    model = build_model("2c2f", (1, 8, 8), 10)
    before = accuracy(model, x_te, y_te)
    result = train(model, x_tr, y_tr, TrainConfig(epochs=10, lr=3e-3, batch_size=64, seed=0), x_te, y_te, progress=False)
    assert before < 0.3
    assert result.test_accuracy > 0.85
    assert len(result.history) == 10 and result.history[-1]["loss"] < result.history[0]["loss"]


def test_gaussian_training_is_seeded_and_robust_to_its_noise(digits):
    x_tr, y_tr, x_te, y_te = digits
    cfg = TrainConfig(method="gaussian", sigma=0.25, epochs=10, lr=3e-3, batch_size=64, seed=7)
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("2c2f", (1, 8, 8), 10)
        train(model, x_tr, y_tr, cfg, progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])  # same seed, same model
    gen = torch.Generator().manual_seed(0)
    noisy = x_te + 0.25 * torch.randn(x_te.shape, generator=gen)
    assert accuracy(model, noisy, y_te) > 0.7


def test_flipcrop_augmentation_keeps_shape(digits):
    x_tr, y_tr, _, _ = digits
    model = build_model("2c2f", (1, 8, 8), 10)
    train(model, x_tr[:64], y_tr[:64], TrainConfig(epochs=1, augment="flipcrop"), progress=False)


@pytest.mark.parametrize("kwargs, msg", [
    ({"method": "gaussian"}, "needs --sigma"),
    ({"method": "gaussian", "sigma": -0.5}, "sigma"),
    ({"method": "nope"}, "unknown training method"),
    ({"epochs": 0}, "epochs"),
    ({"lr": float("nan")}, "learning rate"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"schedule": "warm"}, "schedule"),
])
def test_bad_training_configs(digits, kwargs, msg):
    x_tr, y_tr, _, _ = digits
    with pytest.raises(InputError, match=msg):
        train(build_model("2c2f", (1, 8, 8), 10), x_tr[:8], y_tr[:8], TrainConfig(**kwargs), progress=False)
