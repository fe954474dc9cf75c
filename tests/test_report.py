"""Run report, held-out loss and trackers."""

from __future__ import annotations

import base64
import json
import random
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import SAMPLES
from PIL import Image

from lorakit.config import Config, LoraConfigSection, TrainConfig
from lorakit.data import load_image, scan_folder
from lorakit.evaluate import heldout_indices, heldout_loss
from lorakit.lora import inject_lora
from lorakit.models import FAMILIES
from lorakit.optim import build_optimizer
from lorakit.palette import extract_palette, palette_distance
from lorakit.report import History, recommend, write_report

VOID = {"meta", "img", "br", "hr", "input", "link", "circle", "line", "polyline"}


class Checker(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[dict] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _grid(path, colour):
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_report_is_valid_self_contained_html_naming_the_best_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    brand = [
        _grid(tmp_path / f"b{i}.png", c) for i, c in enumerate([(90, 60, 40), (230, 220, 200)])
    ]
    history = History(brand_palette=extract_palette(brand, k=2))
    for step in range(0, 31, 5):
        history.losses[step] = 1.0 / (step + 1)
        history.lr[step] = 1e-4 * min(1.0, step / 10)
    grids = {}
    for step, colour in ((0, (0, 200, 0)), (10, (90, 60, 40)), (20, (230, 220, 200))):
        grids[step] = _grid(out / f"step-{step:06d}.png", colour)
        pal = palette_distance([grids[step]], history.brand_palette)
        history.add_grid(step, grids[step], palette=pal)
    history.add_checkpoint(0, "", heldout=0.30)
    ck = {s: out / "checkpoints" / f"step-{s:06d}" / "lorakit.safetensors" for s in (10, 20)}
    history.add_checkpoint(10, ck[10], heldout=0.12341)  # tie with step 20 at 4 digits …
    history.add_checkpoint(20, ck[20], heldout=0.12344, palette=0.5)
    history.add_checkpoint(30, out / "lorakit.safetensors", heldout=0.2)
    assert history.palette_at(10) is not None and history.palette_at(10) > 0.5
    assert recommend(history).step == 20  # … broken by the lower palette distance

    path = write_report(out, Config(), {"images": 20, "captions": "20 .txt files"}, history)
    assert path == out / "report.html" and not list(out.glob(".report.html.*"))
    text = path.read_text(encoding="utf-8")
    p = Checker()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert p.tags[:2] == ["html", "head"] and "body" in p.tags
    assert "script" not in p.tags and "link" not in p.tags  # nothing fetched, nothing run
    assert all(img["src"].startswith("data:image/png;base64,") for img in p.imgs)
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in p.imgs}
    assert embedded == {g.read_bytes() for g in grids.values()}, "every grid, inline"
    assert text.count("<svg") == 3  # loss, lr, held-out
    body = "".join(p.text)
    assert "Recommended checkpoint: checkpoints/step-000020/lorakit.safetensors" in body
    assert "images" in body and "[train]" in body  # data summary and resolved config
    back = History.from_dict(json.loads(json.dumps(history.to_dict())))  # resume round trip
    assert back.to_dict() == history.to_dict() and recommend(back).step == 20


def test_no_scored_checkpoint_recommends_nothing(tmp_path):
    h = History()
    h.add_checkpoint(0, "", heldout=0.1)  # the base model is never a recommendation
    h.add_checkpoint(5, tmp_path / "a.safetensors")
    h.add_checkpoint(6, tmp_path / "b.safetensors", heldout=float("nan"))
    assert recommend(h) is None
    text = write_report(tmp_path, Config(), {}, h).read_text()
    assert "none is recommended" in text


# -- held-out loss ------------------------------------------------------------------------------


def _tiny_setup(n=3):
    fam = FAMILIES["sd15"]
    comps = fam.build_tiny(seed=0)
    items = scan_folder(SAMPLES)[:n]
    latents = fam.encode_images(comps, torch.stack([load_image(i.path, 64) for i in items]))
    cond = fam.encode_prompts(comps, [i.caption for i in items])
    return fam, comps, latents, cond


def test_heldout_loss_is_fixed_and_leaves_every_training_rng_alone():
    fam, comps, latents, cond = _tiny_setup()
    inject_lora(comps.unet, LoraConfigSection(rank=4, alpha=8.0, dropout=0.5), seed=0)
    comps.unet.train()
    t = TrainConfig()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    noise_gen = torch.Generator().manual_seed(7)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    gen_state = noise_gen.get_state()

    a = heldout_loss(fam, comps, comps.unet, latents, cond, t, seed=11)
    b = heldout_loss(fam, comps, comps.unet, latents, cond, t, seed=11, batch_size=5)
    c = heldout_loss(fam, comps, comps.unet, latents, cond, t, seed=12)
    assert a == pytest.approx(b, rel=1e-5), "same seed, same number (any batching)"
    assert a != c, "the seed picks the noise"
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert torch.equal(noise_gen.get_state(), gen_state)
    assert comps.unet.training and all(m.training for m in comps.unet.modules())
    assert heldout_indices(20, 4) == [0, 6, 13, 19] and heldout_indices(3, 4) == [0, 1, 2]


def test_heldout_loss_drops_after_real_training_steps():
    fam, comps, latents, cond = _tiny_setup(n=2)
    t = TrainConfig(lr=1e-2, optimizer="adamw", weight_decay=0.0)
    params = inject_lora(comps.unet, LoraConfigSection(rank=8, alpha=8.0), seed=0)
    opt = build_optimizer(params, t, torch.device("cpu"))
    step0 = heldout_loss(fam, comps, comps.unet, latents, cond, t, seed=1234)
    comps.unet.train()
    gen = torch.Generator().manual_seed(0)  # the training noise: not the held-out seed
    for _ in range(30):
        noise, steps = fam.noise_and_timesteps(comps, latents, gen, t)
        loss = fam.loss(comps, comps.unet, latents, cond, noise, steps, t)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = heldout_loss(fam, comps, comps.unet, latents, cond, t, seed=1234)
    assert after < 0.9 * step0, (step0, after)


# -- trackers -----------------------------------------------------------------------------------


def test_tensorboard_event_files_and_wandb_message(tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.errors import ConfigError
    from lorakit.tracking import init_trackers, log_grid, log_scalars, wandb_available

    acc = Accelerator(cpu=True)
    c = Config()
    assert init_trackers(acc, c, tmp_path) == ["tensorboard"]
    for step in (1, 2, 3):
        log_scalars(acc, step, loss=1.0 / step, lr=1e-4, grad_norm=0.5, heldout=None)
    log_grid(acc, 3, _grid(tmp_path / "g.png", (10, 20, 30)))
    acc.end_training()
    run_dir = tmp_path / "logs" / "lorakit"  # hparams go to a sub-folder of their own
    assert list(run_dir.glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(ea.Tags()["scalars"])
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert ea.Tags()["images"] == ["samples"] and ea.Images("samples")[0].step == 3
    acc.trackers.clear()

    c.log.tensorboard = False
    assert init_trackers(acc, c, tmp_path / "off") == []
    assert not (tmp_path / "off" / "logs").exists()
    if not wandb_available():
        c.log.wandb = True
        with pytest.raises(ConfigError, match="pip install wandb"):
            init_trackers(acc, c, tmp_path)
