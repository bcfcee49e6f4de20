"""Photos and pretrained models: local timm checkpoints (safetensors / state dict), a clear
offline error, training-batch crop + flip (seeded, never when scoring), and an RGB JPEG
folder with official splits through prepare → train → score → evaluate with resnet18."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import CleanError
from pipeline.models import create_model
from pipeline.training import augment as A
from pipeline.training.fit import fit
from pipeline.training.recipe import Recipe

from .helpers import cwd, tiny_arrays

runner = CliRunner()


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """A freshly created resnet18 (1000 classes) saved as .pth (torch state dict) and .safetensors."""
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(123)
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save(sd, d / "r18.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "r18.safetensors"))
    return sd, d


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_local_checkpoint_loads_with_a_new_head(resnet18_files, fmt):
    sd, d = resnet18_files
    m = create_model("resnet18", 3, 3, (32, 32), pretrained=True, weights=str(d / f"r18.{fmt}"))
    own = m.state_dict()
    assert own["fc.weight"].shape == (3, 512)  # head re-initialised for 3 classes
    assert all(torch.equal(own[k], sd[k]) for k in own if not k.startswith("fc."))
    gray = create_model("resnet18", 3, 1, (32, 32), pretrained=True, weights=str(d / f"r18.{fmt}"))
    assert gray.conv1.weight.shape == (64, 1, 7, 7)  # timm adapts the stem to 1 channel
    torch.testing.assert_close(gray.conv1.weight[:, 0], sd["conv1.weight"].sum(1))


def test_bad_weights_are_clear(resnet18_files, tmp_path):
    _, d = resnet18_files
    with pytest.raises(CleanError, match="model.weights: .* does not fit 'resnet34'.*missing"):
        create_model("resnet34", 3, 3, (32, 32), pretrained=True, weights=str(d / "r18.safetensors"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CleanError, match="model.weights: cannot load .*junk.pth"):
        create_model("resnet18", 3, 3, (32, 32), pretrained=True, weights=str(tmp_path / "junk.pth"))
    with pytest.raises(CleanError, match="model.weights: file not found"):
        create_model("resnet18", 3, 3, (32, 32), pretrained=True, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(CleanError, match="model.weights is set .* model.pretrained is false"):
        create_model("resnet18", 3, 3, (32, 32), pretrained=False, weights=str(d / "r18.pth"))


def test_offline_pretrained_without_weights_names_model_weights(monkeypatch):
    import huggingface_hub

    import pipeline.models as M

    monkeypatch.setattr(M, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    for name in ("resnet18", "vit_tiny_patch16_224"):
        with pytest.raises(CleanError, match="model.pretrained: true .* set model.weights") as e:
            create_model(name, 3, 3, (32, 32), pretrained=True)
        assert "Traceback" not in str(e.value)


def test_vit_takes_the_data_size(tmp_path):
    import timm

    f = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), f)
    m = create_model("vit_tiny_patch16_224", 4, 3, (32, 32), pretrained=True, weights=str(f))
    assert m.pos_embed.shape[1] == 1 + 4  # 2x2 patches + class token, resized from 14x14 on load
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_crop_flip_matches_torchvision_and_is_seeded():
    x = torch.rand(32, 3, 40, 56)
    p = A.draw(torch.Generator().manual_seed(0), 32, 40, 56)
    assert torch.equal(p, A.draw(torch.Generator().manual_seed(0), 32, 40, 56))
    y = A.apply(x, p)
    for i in range(32):
        np.testing.assert_allclose(y[i].numpy(), A.crop_flip_reference(x[i].numpy(), p[i]), atol=1e-5)
    assert p[:, 4].min() == 0 and p[:, 4].max() == 1
    area = p[:, 2] * p[:, 3] / (40 * 56)
    assert 0.08 * 0.9 <= area.min() and area.max() <= 1.0
    assert A.resolve("auto", 3, (64, 80)) and not A.resolve("auto", 1, (224, 224))
    assert not A.resolve("auto", 3, (32, 32)) and A.resolve("flip-crop", 1, (8, 8)) and not A.resolve("none", 3, (224, 224))


def _recipe(**kw):
    base = dict(model="small_cnn", epochs=2, batch_size=8, lr=1e-2, seed=0, device="cpu")
    base.update(kw)
    return Recipe(**base)


def test_augment_only_in_training_batches_and_deterministic(monkeypatch, one_thread):
    x, y = tiny_arrays(hw=(8, 8))
    same = [fit(x, y, 3, _recipe(augment=a)).model.state_dict() for a in ("auto", "none")]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])  # auto = off for small grayscale sets
    calls = []
    real = A.apply
    monkeypatch.setattr(A, "apply", lambda xb, p: calls.append(len(xb)) or real(xb, p))
    a = fit(x, y, 3, _recipe(augment="flip-crop"), val=(x[:6], y[:6])).model.state_dict()
    assert sum(calls) == 2 * len(y)  # every training sample once per epoch, validation never
    b = fit(x, y, 3, _recipe(augment="flip-crop")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], same[1]["head.weight"])


def _jpeg_folder(root, n_train=12, n_test=6):
    """root/{train,test}/<class>/*.jpg, 32x32 RGB: class k is bright in colour channel k."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % 3
            img = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
            img[..., k] = rng.integers(170, 256, (32, 32))
            path = root / split / "rgb"[k] / f"{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, "JPEG", quality=90)


def test_rgb_jpeg_folder_with_pretrained_resnet18_end_to_end(tmp_path, resnet18_files, one_thread):
    from cli.main import app

    _, d = resnet18_files
    _jpeg_folder(tmp_path / "data" / "photos")
    (tmp_path / "params.yaml").write_text(f"""\
data: {{source: imagefolder, root: data/photos, val_frac: 0.25}}
model: {{name: resnet18, pretrained: true, weights: {d / 'r18.safetensors'}}}
train: {{epochs: 1, batch_size: 4, device: cpu, seeds: [0], augment: flip-crop, track: 4}}
score: {{params: all, self_influence: false, embeddings: false}}
""")
    with cwd(tmp_path):
        for cmd in (["prepare"], ["train"], ["score"], ["evaluate", "--model", "models/base", "--name", "base"]):
            res = runner.invoke(app, cmd)
            assert res.exit_code == 0, (cmd, res.output)
        info = json.loads(open("data/classes.json").read())
        assert info["in_chans"] == 3 and info["counts"] == {"train": 9, "val": 3, "test": 6}
        cfg = json.loads(open("models/base/config.json").read())
        assert cfg["model"] == "resnet18" and cfg["recipe"]["augment"] == "flip-crop"
        rows = open("scores/scores.csv").read().splitlines()
        assert len(rows) == 1 + 9
        assert "accuracy" in json.loads(open("metrics/base.json").read())
