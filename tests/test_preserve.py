"""Anti-bleed preservation (`train.preserve_weight`) and the bleed score, for every family:
the preservation loss is the plain loss + weight × an independently computed MSE, the adapter
switched off is the base model, gradients reach the adapter only, and preservation lowers bleed."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, SAMPLES, cli

from lorakit import planner
from lorakit.config import Config, ConfigError, LoraConfigSection, TrainConfig, resolve
from lorakit.data import load_image, scan_folder
from lorakit.lora import inject_lora
from lorakit.models import FAMILIES
from lorakit.optim import build_optimizer
from lorakit.preserve import (
    Preservation,
    Recording,
    adapters_disabled,
    base_prediction,
    cached_captions,
    heldout_bleed,
    preservation_mse,
    without_trigger,
)

CAPTIONS = ["tdwl, a coffee cup on a table", "a paper bag, tdwl style"]
STEPS = 12


def _setup(name: str, lora: LoraConfigSection | None = None):
    """(family, components, pristine copy of the denoiser, LoRA'd denoiser, latents, cond,
    preservation-prompt cond) at 64 px; the LoRA's up weights randomised so it is not zero."""
    torch.manual_seed(0)
    fam = FAMILIES[name]
    comps = fam.build_tiny(0)
    den = getattr(comps, fam.denoiser_name)
    pristine = copy.deepcopy(den)
    lora = lora or LoraConfigSection(rank=4, alpha=4.0)
    params = inject_lora(den, replace(lora, target_modules=list(fam.default_targets)), 0)
    with torch.no_grad():
        for n, p in den.named_parameters():
            if "lora_B" in n or "lokr_w" in n:  # (peft starts these at 0 or at identity)
                p.normal_(0, 0.3)
    den.eval()  # dropout off: every forward below is deterministic
    pristine.eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        lat = fam.encode_images(comps, torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1)
        pres = Preservation(1.0, "tdwl", "coffee brand")
        cond = fam.encode_prompts(comps, CAPTIONS)
        text = fam.encode_prompts(comps, [pres.caption(c) for c in CAPTIONS])
    for k, v in fam.image_conditioning(comps, (64, 64), (0, 0), (64, 64)).items():
        cond[k] = torch.cat([v, v])
    return fam, comps, pristine, den, params, lat, cond, text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_preservation_is_plain_loss_plus_weighted_mse_to_the_base_model(family):
    torch.set_num_threads(1)
    fam, comps, pristine, den, params, lat, cond, text = _setup(family)
    train = TrainConfig(timestep_sampling="uniform")
    noise, t = fam.noise_and_timesteps(comps, lat, torch.Generator().manual_seed(2), train)

    rec = Recording(fam)
    plain = rec.family.loss(comps, den, lat, cond, noise, t, train)
    assert torch.equal(plain, fam.loss(comps, den, lat, cond, noise, t, train)), "same loss"
    call = rec.only_call()
    # the recorded prediction is the one the loss scored, at the recorded noisy latents
    if t.dtype.is_floating_point:  # flow: x_σ = (1 - σ) x0 + σ n, target n - x0
        s = t.view(-1, 1, 1, 1)
        assert torch.allclose(call.noisy, (1 - s) * lat + s * noise, atol=1e-6)
        target = noise - lat
    else:  # DDPM epsilon (the tiny schedulers' prediction type)
        assert comps.scheduler.config.prediction_type == "epsilon"
        target = noise
    assert torch.allclose(plain, F.mse_loss(call.output, target), rtol=1e-5)

    # the adapter switched off IS the base model (a copy taken before the LoRA went in)
    cond_p = {**call.cond, **text}
    base = base_prediction(fam, den, call, cond_p)
    assert not base.requires_grad
    with torch.no_grad():
        want_base = fam.predict(pristine, call.noisy, call.timesteps, cond_p)
    assert torch.allclose(base, want_base, atol=1e-5), (base - want_base).abs().max()
    assert all(p.requires_grad for p in params), "requires_grad restored after the base pass"

    # plain + w · mse equals an independent computation, and its gradient is the adapter's
    w = 0.7
    mse = preservation_mse(rec, den, den, text)
    adapter_ind = fam.predict(den, call.noisy, call.timesteps, cond_p)
    mse_ind = ((adapter_ind.float() - want_base.float()) ** 2).mean()
    assert mse.item() > 1e-6, "a non-zero LoRA changes the preservation prompt's prediction"
    assert torch.allclose(plain + w * mse, plain + w * mse_ind, rtol=1e-4)
    # (a LoRA the prediction does not reach, e.g. a last block's text stream, gets None)
    grads = torch.autograd.grad(w * mse, params, allow_unused=True)
    want = torch.autograd.grad(w * mse_ind, params, allow_unused=True)
    for g, gw in zip(grads, want, strict=True):
        assert (g is None) == (gw is None)
        assert g is None or torch.allclose(g, gw, rtol=1e-3, atol=1e-7)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    assert not any(p.requires_grad for p in pristine.parameters() if p.grad is not None)


def test_adapters_disabled_is_exact_for_lycoris_and_dora_and_restores_the_model():
    torch.set_num_threads(1)
    for lora in (LoraConfigSection(rank=4, alpha=4.0, type="lokr"),
                 LoraConfigSection(rank=4, alpha=4.0, use_dora=True)):  # fmt: skip
        fam, _, pristine, den, params, lat, cond, _ = _setup("sd15", lora)
        if lora.use_dora:  # a trained magnitude: DoRA is not the identity then
            with torch.no_grad():
                for n, p in den.named_parameters():
                    if "magnitude" in n:
                        p.mul_(1.5)
        t = torch.tensor([10, 700])
        with torch.no_grad():
            on = fam.predict(den, lat, t, cond)
            with adapters_disabled(den) as n:
                off = fam.predict(den, lat, t, cond)
            again = fam.predict(den, lat, t, cond)
            want = fam.predict(pristine, lat, t, cond)
        assert n > 0 and not torch.allclose(on, want, atol=1e-4), lora
        assert torch.allclose(off, want, atol=1e-5), lora
        assert torch.equal(on, again), "the adapter is back, bit for bit"
        assert all(p.requires_grad for p in params)


def test_preservation_captions_and_trigger_removal():
    pres = Preservation(1.0, "tdwl", "coffee brand")
    assert pres.caption("tdwl, a cup") == "coffee brand, a cup"
    assert pres.caption("a tdwl mug, tdwl style") == "a coffee brand mug, coffee brand style"
    assert pres.caption("no trigger here") == "no trigger here"
    assert Preservation(1.0, "tdwl", "").caption("tdwl, a cup") == ""
    assert without_trigger("tdwl, a coffee cup", "tdwl") == "a coffee cup"
    assert without_trigger("a tdwl style mug", "tdwl") == "a style mug"
    assert without_trigger("cup, tdwl, blue", "tdwl") == "cup, blue"
    assert without_trigger("tdwl", "tdwl") == ""
    assert without_trigger("plain caption", "") == "plain caption"
    caps = ["tdwl, a cup", "tdwl, a bag", "a plate"]
    # preservation prompts of every caption + trigger-less held-out captions, new ones only
    assert cached_captions(pres, "tdwl", caps, [1]) == ["a bag", "coffee brand, a bag",
                                                        "coffee brand, a cup"]  # fmt: skip
    assert cached_captions(None, "", caps, [0, 1]) == []


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["train.preserve_weight=1", "lora.train_text_encoder=true"],
         ["train.preserve_weight", "lora.train_text_encoder = false"]),
        (["train.preserve_weight=1", "train.preserve_prompt='logo'", "data.trigger=''"],
         ["train.preserve_prompt", "--trigger"]),
        (["train.preserve_weight=1", "train.preserve_prompt='tdwl logo'"],
         ["contains the trigger", "'logo'"]),
        (["train.preserve_weight=-1"], ["train.preserve_weight", "0 or more"]),
        (["train.timestep_bias='detail'"], ["train.timestep_bias", "'style'"]),
    ],
)  # fmt: skip
def test_bad_preservation_settings_are_one_paragraph_and_nothing_is_written(sets, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve("tiny-cpu", sets=sets)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    args = [a for s in sets for a in ("--set", s)]
    out = cli("train", SAMPLES, *FAST, "--out", tmp_path / "run", *args, expect=2)
    assert "Traceback" not in out.output
    assert not (tmp_path / "run").exists()


def test_keys_are_documented():
    text = cli("config", "--keys").output
    for key in ("train.preserve_weight", "train.preserve_prompt", "train.timestep_bias",
                "eval.bleed"):  # fmt: skip
        assert key in text


def _bleed_of(fam, comps, den, lat, cond_free, cache=None) -> float:
    return heldout_bleed(
        fam, comps, den, lat, cond_free, TrainConfig(), 1234, timesteps=4, base_cache=cache
    )


def test_preservation_lowers_bleed_on_a_fixed_batch():
    """Train the same LoRA twice from the same start on the same batch, once with preservation
    on the class prompt: its bleed (adapter vs base on the trigger-less captions) is lower,
    while it still learns the training captions."""
    torch.set_num_threads(1)
    fam = FAMILIES["sd15"]
    items = scan_folder(SAMPLES, trigger="tdwl")[:2]
    caps = [i.caption for i in items]
    results = {}
    for weight in (0.0, 4.0):
        comps = fam.build_tiny(seed=0)
        den = comps.unet
        pres = Preservation(weight, "tdwl", "coffee")
        lat = fam.encode_images(comps, torch.stack([load_image(i.path, 64) for i in items]))
        with torch.no_grad():
            cond = fam.encode_prompts(comps, caps)
            text = fam.encode_prompts(comps, [pres.caption(c) for c in caps])
            free = fam.encode_prompts(comps, [without_trigger(c, "tdwl") for c in caps])
        params = inject_lora(den, LoraConfigSection(rank=8, alpha=8.0), seed=0)
        opt = build_optimizer(params, TrainConfig(lr=1e-2, optimizer="adamw", weight_decay=0.0),
                              torch.device("cpu"))  # fmt: skip
        fixed = fam.noise_and_timesteps(
            comps, lat, torch.Generator().manual_seed(99), TrainConfig()
        )

        def held(den=den, comps=comps, lat=lat, cond=cond, fixed=fixed):
            with torch.no_grad():
                return fam.loss(comps, den, lat, cond, *fixed, TrainConfig()).item()

        before = held()
        den.train()
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(step)
            noise, t = fam.noise_and_timesteps(comps, lat, gen, TrainConfig())
            rec = Recording(fam)
            rec.family.loss(comps, den, lat, cond, noise, t, TrainConfig()).backward()
            if weight:
                (weight * preservation_mse(rec, den, den, text)).backward()
            opt.step()
            opt.zero_grad()
        results[weight] = (_bleed_of(fam, comps, den, lat, free), before, held())
    (bleed_off, *_), (bleed_on, before, after) = results[0.0], results[4.0]
    assert bleed_off > 0
    assert bleed_on < 0.5 * bleed_off, results
    assert after < 0.95 * before, results  # it still learns the captions with the trigger


def _two_images(folder):
    """A data folder with the first two sample images and their captions (fewer to cache)."""
    folder.mkdir()
    for img in sorted(SAMPLES.glob("*.png"))[:2]:
        shutil.copy(img, folder / img.name)
        shutil.copy(img.with_suffix(".txt"), folder / img.with_suffix(".txt").name)
    return folder


def test_training_with_preservation_by_config_alone(tmp_path):
    """`--set train.preserve_weight=…` is all it takes. Step 1 starts from a zero LoRA, where the
    adapter equals the base model: the preservation term and its gradient are 0, so both runs
    log the same loss and make the same update. At step 2 the run with preservation logs the
    same plain loss + a positive term. The report has a bleed column, 0 at step 0."""
    data = _two_images(tmp_path / "data")
    losses = {}
    for weight in (0, 2):
        out = tmp_path / f"w{weight}"
        cli("train", data, *FAST, "--out", out, "--steps", 2, "--lr", 0.05,
            "--set", "train.warmup_steps=0",
            "--set", f"train.preserve_weight={weight}", "--set", "train.preserve_prompt='coffee'",
            "--set", "eval.images=2", "--set", "eval.timesteps=1",
            "--set", "eval.bleed=true")  # fmt: skip
        losses[weight] = json.loads((out / "run.json").read_text())["losses"]
    assert losses[2]["1"] == losses[0]["1"], losses
    assert losses[2]["2"] > losses[0]["2"], losses
    report = (tmp_path / "w2" / "report.html").read_text()
    assert "<th>bleed</th>" in report
    row0 = report.split("base model", 1)[1].split("</tr>", 1)[0]
    assert "<td>0</td>" in row0, row0


def test_planner_counts_the_preservation_passes_and_base_prediction():
    c = resolve("sd15", sets=["train.preserve_weight=1", "data.trigger='tdwl'"])
    on, off = planner.plan(c), planner.plan(resolve("sd15"))
    assert on.passes == {"forward": 2, "forward without grad": 1, "backward": 2}
    assert off.passes == {"forward": 1, "forward without grad": 0, "backward": 1}
    base = on.rows["anti-bleed base prediction"]
    assert (c.train.batch_size, c.data.resolution, c.train.mixed_precision) == (2, 512, "fp16")
    assert base == 2 * 4 * 64 * 64 * 2  # batch 2 × [4, 64, 64] latents, fp16 output
    assert on.phases["train"] == off.phases["train"] + base
    assert "anti-bleed" in " ".join(on.notes)
    assert "2 forward, 1 forward without grad, 2 backward" in planner.table(on, None)


def _final_bleed(out) -> float:
    """The bleed the run scored at its last step (the report's data, `OUT/report.json`)."""
    records = json.loads((out / "report.json").read_text())["history"]["checkpoints"]
    return max(records, key=lambda r: r["step"])["bleed"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_preservation_lowers_the_reported_bleed_of_a_cli_run(family, tmp_path):
    """Two 30-step CLI runs that differ only in train.preserve_weight: the bleed the run
    itself scores at its final checkpoint is lower with preservation."""
    bleed = {}
    for weight in (0, 4):
        out = tmp_path / f"w{weight}"
        cli("train", SAMPLES, *FAST, "--out", out, "--steps", 30, "--lr", 5e-3,
            "--model", f"tiny:{family}",
            "--set", f"train.preserve_weight={weight}",
            "--set", "train.preserve_prompt='coffee'", "--set", "eval.bleed=true")  # fmt: skip
        bleed[weight] = _final_bleed(out)
    assert 0 < bleed[4] < 0.5 * bleed[0], bleed


def test_bleed_score_reads_the_base_model_through_disabled_adapters():
    """The held-out bleed is the mean squared difference to a separate copy of the base model,
    0 for a zero LoRA."""
    torch.set_num_threads(1)
    fam, comps, pristine, den, _, lat, cond, _ = _setup("sdxl")
    value = _bleed_of(fam, comps, den, lat, cond)
    rec = Recording(fam)
    from lorakit.evaluate import heldout_draws

    rep, noise, steps = heldout_draws(fam, comps, lat, TrainConfig(), 1234, 4)
    total = 0.0
    with torch.no_grad():
        for s in (slice(0, 4), slice(4, 8)):
            idx = torch.arange(8)[s] // 4
            c = {k: v[idx] for k, v in cond.items()}
            rec.calls.clear()
            rec.family.loss(comps, den, rep[s], c, noise[s], steps[s], TrainConfig())
            call = rec.only_call()
            want = fam.predict(pristine, call.noisy, call.timesteps, call.cond)
            total += F.mse_loss(call.output, want).item() * 4
    assert value == pytest.approx(total / 8, rel=1e-4)
    # the base predictions are kept by the first call and read by the next ones
    cache: list[torch.Tensor] = []
    assert _bleed_of(fam, comps, den, lat, cond, cache) == value and len(cache) == 2
    assert _bleed_of(fam, comps, den, lat, cond, cache) == value
    cache[:] = [torch.zeros_like(b) for b in cache]
    assert _bleed_of(fam, comps, den, lat, cond, cache) != value
    with torch.no_grad():
        for n, p in den.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert _bleed_of(fam, comps, den, lat, cond) == 0.0


def test_config_default_is_off():
    assert Config().train.preserve_weight == 0 and Config().train.timestep_bias == "none"
