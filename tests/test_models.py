import pytest
import torch

from certaudit.errors import CheckpointError, InputError
from certaudit.models import (ARCHITECTURES, ModelMeta, build_model, load_checkpoint, read_meta,
                              read_state_dict, save_checkpoint)


def _meta(arch="2c2f", shape=(1, 8, 8)):
    return ModelMeta(arch=arch, dataset="digits", input_shape=list(shape), num_classes=10,
                     mean=[0.5] * shape[0], std=[0.25] * shape[0], method="gaussian", sigma=0.25, norm="l2")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architectures_build_and_run(arch):
    shape = (3, 32, 32) if arch.startswith("resnet") else (1, 28, 28)
    model = build_model(arch, shape, 10, [0.5] * shape[0], [0.25] * shape[0])
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert type(model[0]).__name__ == "Normalize"


def test_resnet110_has_the_published_parameter_count():
    # Cohen et al.'s CIFAR ResNet-110 has 1.73M parameters
    n = sum(p.numel() for p in build_model("resnet110", (3, 32, 32), 10).parameters())
    assert 1_700_000 < n < 1_760_000


def test_normalize_inside_the_model():
    model = build_model("2c2f", (1, 8, 8), 10, [0.5], [0.25])
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(model[0](x), (x - 0.5) / 0.25)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("2c2f", (1, 8, 8), 10, [0.5], [0.25]).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    loaded, meta = load_checkpoint(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert meta.sigma == 0.25 and meta.arch == "2c2f" and meta.input_shape == [1, 8, 8]
    assert read_meta(path).method == "gaussian"


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    model = build_model("2c2f", (1, 8, 8), 10)
    good = save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    # safetensors without certaudit metadata
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="certaudit import"):
        load_checkpoint(plain)


def test_mismatched_weights_and_nan_weights_are_refused(tmp_path):
    model = build_model("2c2f", (1, 8, 8), 10)
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta(arch="4c3f"))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "n.safetensors", model, _meta())
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)


def test_unsupported_format_version(tmp_path):
    model = build_model("2c2f", (1, 8, 8), 10)
    meta = _meta()
    meta.format_version = 99
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickles_with_code_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    ok = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(2)}, ok)
    assert torch.equal(read_state_dict(ok)["w"], torch.ones(2))


def test_bad_architecture_arguments():
    with pytest.raises(InputError, match="unknown architecture"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(InputError):
        build_model("2c2f", (1, 8), 10)
    with pytest.raises(InputError):
        build_model("2c2f", (1, 8, 8), 1)
    with pytest.raises(InputError):
        build_model("2c2f", (1, 8, 8), 10, [0.5], [0.0])
