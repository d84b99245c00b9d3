"""Using the weights: a checkpoint carries its class names and input normalisation, and `fastcifar predict` turns
images of any size into the model's input exactly as training did."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from support import tiny_config
from fastcifar.cli import main
from fastcifar.data.augment import CIFAR_MEAN, CIFAR_STD, Normalizer
from fastcifar.data.cifar import SYNTHETIC_DATA_SEED, make_synthetic
from fastcifar.model import resnet18_cifar
from fastcifar.predict import load_image
from fastcifar.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("predict") / "run"
    fit(tiny_config(run, epochs=1))
    return run


def test_checkpoints_carry_class_names_and_normalisation(run):
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / name, weights_only=False)
        assert state["classes"] == [f"synthetic-{c}" for c in range(10)], name
        assert state["input"]["mean"] == list(CIFAR_MEAN) and state["input"]["std"] == list(CIFAR_STD), name
        assert state["input"]["size"] == 32 and "[0, 1]" in state["input"]["range"], name


def test_predict_prints_the_top_classes_with_training_preprocessing(run, tmp_path, capsys):
    """A 32x32 PNG gives the probabilities the model gives the loader's normalised tensor of the same pixels."""
    pixels = make_synthetic(8, 10, seed=SYNTHETIC_DATA_SEED).train_images[:2]
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(image).save(paths[-1])
    assert main(["predict", str(run / "best.pt"), *map(str, paths), "--top", "2", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    best = torch.load(run / "best.pt", weights_only=False)
    model = resnet18_cifar(num_classes=10).eval()
    model.load_state_dict(best["model"])
    with torch.no_grad():
        x = Normalizer()(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        want = model(x).softmax(1)
    for result, path, probs in zip(results, paths, want):
        assert result["image"] == str(path) and len(result["top"]) == 2
        top = probs.topk(2)
        assert [t["index"] for t in result["top"]] == top.indices.tolist()
        assert [t["class"] for t in result["top"]] == [f"synthetic-{i}" for i in top.indices.tolist()]
        assert np.allclose([t["probability"] for t in result["top"]], top.values.tolist(), atol=1e-5)
    assert main(["predict", str(run / "best.pt"), str(paths[0])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{paths[0]}: synthetic-") and line.count(" %") == 3


def test_any_size_becomes_the_centre_32x32_of_the_shorter_side(tmp_path):
    """64 wide x 128 tall, red / green / blue bands: resized to 32 x 64, the centre 32 rows are the green band."""
    bands = np.zeros((128, 64, 3), dtype=np.uint8)
    bands[:24, :, 0] = 255
    bands[24:104, :, 1] = 255
    bands[104:, :, 2] = 255
    Image.fromarray(bands).save(tmp_path / "tall.jpg", quality=100)
    image = load_image(tmp_path / "tall.jpg", 32)
    assert image.shape == (3, 32, 32)
    assert (image[1] > 0.95).all() and (image[0] < 0.05).all() and (image[2] < 0.05).all()
    Image.fromarray(bands[:, :, 1]).save(tmp_path / "grey.png")  # one channel: made RGB
    assert load_image(tmp_path / "grey.png", 32).shape == (3, 32, 32)


def test_predict_errors_are_one_line(run, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["predict", str(run / "best.pt"), str(tmp_path / "notes.png")]) == 1
    err = capsys.readouterr().err
    assert "notes.png is not an image" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", str(run), str(tmp_path / "notes.png")]) == 1
    assert f"give a checkpoint, e.g. {run / 'best.pt'}" in capsys.readouterr().err
