"""Reading image folders: captions, trigger words, odd image modes, clear errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lorakit.data import apply_trigger, load_image, scan_folder
from lorakit.errors import LorakitError


def test_apply_trigger():
    assert apply_trigger("[trigger] style, a cup", "tdwl") == "tdwl style, a cup"
    assert apply_trigger("a cup in {trigger} style", "tdwl") == "a cup in tdwl style"
    assert apply_trigger("a cup", "tdwl") == "tdwl, a cup"
    assert apply_trigger("tdwl, a cup", "tdwl") == "tdwl, a cup"
    assert apply_trigger("", "tdwl") == "tdwl"
    assert apply_trigger("[trigger], a cup", "") == "a cup"


def test_scan_folder_captions_and_defaults(tmp_path):
    Image.new("RGB", (80, 64), "red").save(tmp_path / "b.PNG")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("  a blue   square\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    items = scan_folder(tmp_path, trigger="zz", default_caption="a picture")
    assert [i.path.name for i in items] == ["a.jpg", "b.PNG"]
    assert [i.caption for i in items] == ["zz, a blue square", "zz, a picture"]


def test_scan_folder_errors(tmp_path):
    with pytest.raises(LorakitError, match=r"does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(LorakitError, match=r"No images"):
        scan_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LorakitError, match=r"not UTF-8"):
        scan_folder(tmp_path)


def test_load_image_modes_and_crop(tmp_path):
    rgba = Image.new("RGBA", (100, 50), (255, 0, 0, 0))  # fully transparent → white background
    rgba.save(tmp_path / "t.png")
    x = load_image(tmp_path / "t.png", 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))
    Image.new("L", (40, 60), 0).save(tmp_path / "g.png")
    y = load_image(tmp_path / "g.png", 32)
    assert y.shape == (3, 32, 32) and torch.allclose(y, -torch.ones_like(y))
    Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg", 16).shape == (3, 16, 16)


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with pytest.raises(LorakitError, match=r"broken\.png"):
        load_image(tmp_path / "broken.png", 32)


def test_random_crop_is_seeded_and_differs_from_center(tmp_path):
    import random

    img = Image.new("RGB", (128, 32))
    for x in range(128):
        for y in range(32):
            img.putpixel((x, y), (x * 2, y * 8, 0))
    img.save(tmp_path / "wide.png")
    center = load_image(tmp_path / "wide.png", 16)
    a = load_image(tmp_path / "wide.png", 16, center_crop=False, rng=random.Random(3))
    b = load_image(tmp_path / "wide.png", 16, center_crop=False, rng=random.Random(3))
    assert torch.equal(a, b)
    crops = {
        load_image(tmp_path / "wide.png", 16, False, random.Random(s)).sum().item()
        for s in range(8)
    }
    assert len(crops) > 1 and center.shape == a.shape
