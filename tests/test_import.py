"""`certaudit import --format cohen`: Cohen et al.'s checkpoints become certaudit checkpoints."""

from __future__ import annotations

import json

import torch

from certaudit.cli import main
from certaudit.data import dataset_info
from certaudit.models import build_model, load_checkpoint


class NotATensor:
    """A custom class: pickling it needs code, so a weights-only load must refuse it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def _cohen_file(tmp_path, arch="cifar_resnet20", depth_arch="resnet20", data_parallel=True, folder="noise_0.25",
                drop_batches_tracked=False, seed=0):
    """A fake Cohen checkpoint: Sequential(NormalizeLayer, net) state dict, 'module.' prefixes."""
    torch.manual_seed(seed)
    info = dataset_info("cifar10")
    ref = build_model(depth_arch, info.shape, 10, info.mean, info.std).eval()
    for m in ref.modules():  # non-trivial BatchNorm statistics so a mix-up shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("0."):
            continue  # Cohen's NormalizeLayer keeps mean/std as plain attributes: not saved
        if drop_batches_tracked and k.endswith("num_batches_tracked"):
            continue
        state[k.replace("1.", "1.module.", 1) if data_parallel else k] = v.clone()
    path = tmp_path / "cifar10" / depth_arch / folder / "checkpoint.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 90, "arch": arch, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]}}, path)
    return ref, path


def test_import_cohen_resnet20_gives_the_same_function(tmp_path, capsys):
    ref, path = _cohen_file(tmp_path)
    out = tmp_path / "imported.safetensors"
    assert main(["import", "--format", "cohen", str(path), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "resnet20" and result["sigma"] == 0.25  # σ parsed from noise_0.25
    model, meta = load_checkpoint(out)
    assert meta.method == "gaussian" and meta.sigma == 0.25 and meta.dataset == "cifar10"
    assert meta.mean == list(dataset_info("cifar10").mean)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_import_without_data_parallel_and_without_batch_counters(tmp_path):
    ref, path = _cohen_file(tmp_path, data_parallel=False, drop_batches_tracked=True, folder="noise_1.00")
    out = tmp_path / "m.safetensors"
    assert main(["import", "--format", "cohen", str(path), "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert meta.sigma == 1.0
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_import_then_certify_with_the_recorded_sigma(tmp_path):
    from certaudit.defenses.registry import build_defense

    _, path = _cohen_file(tmp_path)
    out = tmp_path / "m.safetensors"
    assert main(["import", "--format", "cohen", str(path), "--out", str(out), "--sigma", "0.5"]) == 0
    model, meta = load_checkpoint(out)
    sc = build_defense("smoothing", model, meta, {"n0": 4, "n": 8, "seed": 0})
    assert sc.sigma == 0.5
    assert len(sc.certify(torch.rand(1, 3, 32, 32))) == 1


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth.tar"
    torch.save({"arch": "cifar_resnet20", "state_dict": NotATensor()}, path)
    rc = main(["import", "--format", "cohen", str(path), "--sigma", "0.25", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "refused" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_imports_are_one_line_errors(tmp_path, capsys):
    _, path = _cohen_file(tmp_path, folder="plain")
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["import", "--format", "kw2", str(path), "--out", out], "unknown format"),
        (["import", "--format", "cohen", str(path), "--out", out], "--sigma"),  # no noise_<σ> in the path
        (["import", "--format", "cohen", str(tmp_path / "missing.pth"), "--sigma", "0.25", "--out", out], "not found"),
        (["import", "--format", "cohen", str(path), "--sigma", "0.25", "--dataset", "mnist", "--out", out], "3x32x32"),
        (["import", "--format", "cohen", str(path), "--sigma", "-1", "--out", out], "sigma"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_imagenet_resnet50_and_mismatched_weights_are_refused_clearly(tmp_path, capsys):
    path = tmp_path / "noise_0.50" / "checkpoint.pth.tar"
    path.parent.mkdir()
    torch.save({"arch": "resnet50", "state_dict": {"1.module.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    assert main(["import", "--format", "cohen", str(path), "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "do not match resnet50" in capsys.readouterr().err  # a partial ResNet-50 is refused

    _, p20 = _cohen_file(tmp_path, arch="cifar_resnet110")  # resnet20 weights labelled as resnet110
    assert main(["import", "--format", "cohen", str(p20), "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "do not match" in capsys.readouterr().err


def test_architecture_is_inferred_when_the_file_has_only_a_state_dict(tmp_path):
    ref, path = _cohen_file(tmp_path)
    raw = torch.load(path, weights_only=True)
    bare = tmp_path / "noise_0.12" / "bare.pth"
    bare.parent.mkdir()
    torch.save(raw["state_dict"], bare)
    out = tmp_path / "bare.safetensors"
    assert main(["import", "--format", "cohen", str(bare), "--out", str(out)]) == 0
    model, meta = load_checkpoint(out)
    assert meta.arch == "resnet20" and meta.sigma == 0.12


def test_import_cohen_imagenet_resnet50_without_torchvision(tmp_path, capsys):
    """ImageNet ResNet-50 (torchvision names, DataParallel-wrapped as in Cohen et al.'s code) imports."""
    torch.manual_seed(0)
    info = dataset_info("imagenet")
    ref = build_model("resnet50", info.shape, 1000, info.mean, info.std).eval()
    assert sum(p.numel() for p in ref.parameters()) == 25_557_032  # torchvision's resnet50 count
    state = {k.replace("1.", "1.module.", 1): v.half() for k, v in ref.state_dict().items() if not k.startswith("0.")}
    assert "1.module.layer4.2.conv3.weight" in state and "1.module.fc.weight" in state
    path = tmp_path / "imagenet" / "resnet50" / "noise_0.50" / "checkpoint.pth.tar"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 90, "state_dict": state}, path)  # no "arch": inferred from the layers
    out = tmp_path / "r50.safetensors"
    assert main(["import", "--format", "cohen", str(path), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "resnet50" and result["dataset"] == "imagenet" and result["sigma"] == 0.5
    model, meta = load_checkpoint(out)
    assert meta.input_shape == [3, 224, 224] and meta.mean == list(info.mean)
    half_ref = build_model("resnet50", info.shape, 1000, info.mean, info.std).eval()
    half_ref.load_state_dict({k: (v.half().to(v.dtype) if v.is_floating_point() else v)
                              for k, v in ref.state_dict().items()})
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(x), half_ref(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_imagenet_folder_loader(tmp_path):
    """<class>/*.JPEG folders: sorted class names are the labels; resize 256 then center crop 224."""
    import numpy as np
    from PIL import Image

    from certaudit.data import load_dataset
    from certaudit.errors import DataNotFoundError

    for cls, (w, h) in (("n01440764", (400, 300)), ("n01443537", (256, 512))):
        (tmp_path / "val" / cls).mkdir(parents=True)
        img = np.zeros((h, w, 3), dtype=np.uint8)
        img[:, :, 2] = 255  # blue border ...
        img[h // 2 - 40:h // 2 + 40, w // 2 - 40:w // 2 + 40] = (255, 0, 0)  # ... red centre
        Image.fromarray(img).save(tmp_path / "val" / cls / "a.JPEG", quality=95)
    x, y = load_dataset("imagenet", "test", tmp_path)
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]
    centre = x[:, :, 112, 112]
    assert bool((centre[:, 0] > 0.9).all()) and bool((centre[:, 2] < 0.1).all())
    try:
        load_dataset("imagenet", "test", None)
    except DataNotFoundError as exc:
        assert "--data-root" in str(exc)
    else:
        raise AssertionError("imagenet without a root must fail clearly")
