"""Preview grids from prompt embeddings encoded once (`encode_prompt_rows`): the same pixels as
the prompt strings give, no text encoder called while rendering, used by `lorakit train` when
the text encoders are frozen, and planned without the text encoders in the sample phase."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST, SAMPLES, cli

from lorakit import config as cfg
from lorakit import planner, sampling
from lorakit.config import SampleConfig
from lorakit.models import FAMILIES
from lorakit.sampling import encode_prompt_rows, grid_spec, render_cells

# Row 0: no negative (CFG pipelines encode "" or SDXL's zeros); row 1: a negative; row 2: CFG
# pipelines: CFG off (`--l 0`: off by every pipeline's rule, Z-Image's `> 0` included; no
# negative used); FLUX: true CFG with its negative (`--l 2`).
PROMPTS = {
    "sd": ["a cup", "a bag --n blurry, dark --d 5", "a box --n noise --l 0"],
    "flux": ["a cup", "a bag --n blurry, dark --d 5", "a box --n noise --l 2"],
}
NEG = {"negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_embeds_mask"}


class TextEncoderCalled(AssertionError):
    pass


def _refuse(module, args):
    raise TextEncoderCalled(type(module).__name__)


def _arrays(cells) -> list[np.ndarray]:
    return [np.asarray(c.image.convert("RGB"), dtype=np.int16) for c in cells]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grid_from_embeddings_matches_grid_from_strings(family):
    fam = FAMILIES[family]
    comps = fam.build_tiny(seed=0)
    pipe = fam.pipeline(comps)
    true_cfg = family in ("flux", "qwen-image")  # CFG only with a negative and --l > 1
    prompts = PROMPTS["flux" if true_cfg else "sd"]
    spec = grid_spec(SampleConfig(prompts=prompts, seeds=[0, 3], steps=2), "", 64)

    from_strings = render_cells(pipe, spec)
    embeds = encode_prompt_rows(pipe, spec)
    assert embeds is not None and len(embeds) == 3
    # The negative is encoded exactly when the row's call uses it.
    if true_cfg:
        assert [bool(NEG & set(e)) for e in embeds] == [False, False, True]
    else:  # (FLUX.2 klein base: CFG against the empty prompt wherever --l > 1)
        has_neg = [bool(NEG & set(e)) for e in embeds]
        assert has_neg == [True, True, False]
    encoders = [m for n, m in fam.frozen_modules(comps).items() if n != "vae"]
    hooks = [m.register_forward_pre_hook(_refuse) for m in encoders]
    try:
        from_embeds = render_cells(pipe, spec, embeds)
        with pytest.raises(TextEncoderCalled):  # the hooks do catch a string render
            render_cells(pipe, spec)
    finally:
        for h in hooks:
            h.remove()

    a, b = _arrays(from_strings), _arrays(from_embeds)
    assert [c.seed for c in from_strings] == [c.seed for c in from_embeds]
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) <= 1
    # the rows' embeddings are what decides the images: row 0's embeddings in row 1's place
    # give another picture
    swapped = render_cells(pipe, spec, [embeds[0], embeds[0], embeds[2]])
    # (the tiny random Qwen-Image's text path moves its pixels by about one level only)
    assert np.abs(_arrays(swapped)[2] - a[2]).max() > (0 if family == "qwen-image" else 8)


LONG = (
    "a red ceramic cup with a golden handle on a wooden table beside a window, soft morning "
    "light, studio photograph, brand colours, minimal background, high detail"
)


@pytest.mark.parametrize("family", [n for n, f in FAMILIES.items() if f.text_length])
def test_previews_encode_prompts_to_the_runs_text_length(family):
    """`GridSpec.text_length` (training's `RunSpec.text_length`) reaches the pipeline on both
    render paths: from strings (`pipeline_kwargs`) and from embeddings (`encode_prompt_rows`).
    A caption longer than the length makes it matter for every family (truncation; FLUX, SD3
    and klein also attend to the padding)."""
    fam = FAMILIES[family]
    comps = fam.build_tiny(seed=0)
    pipe = fam.pipeline(comps)

    def image(length: int, from_embeds: bool) -> np.ndarray:
        spec = grid_spec(SampleConfig(prompts=[LONG], seeds=[0], steps=2), "", 64, length)
        embeds = encode_prompt_rows(pipe, spec) if from_embeds else None
        if embeds is not None:
            pe = embeds[0]["prompt_embeds"]  # (Z-Image: a list of one [tokens, D] tensor)
            tokens = pe[0].shape[0] if isinstance(pe, list) else pe.shape[1]
            assert tokens in (16, 16 + 77)  # SD3: CLIP's 77 + T5's 16
        return _arrays(render_cells(pipe, spec, embeds))[0]

    short = image(16, from_embeds=False)
    assert np.abs(image(16, from_embeds=True) - short).max() <= 1
    # (the tiny random Qwen-Image's text path moves its pixels by about one level only)
    assert np.abs(image(0, from_embeds=False) - short).max() > (0 if family == "qwen-image" else 8)


# The string path with text-encoder training is also what `lorakit sample` runs (tests there).
@pytest.mark.parametrize(
    "model,train_te",
    [
        ("tiny:sd15", False),
        pytest.param("tiny:sd15", True, marks=pytest.mark.slow),
        ("tiny:z-image", False),  # per-prompt lists of embeddings
    ],
)
def test_training_grids_use_embeddings_only_with_frozen_text_encoders(
    tmp_path, monkeypatch, model, train_te
):
    """`lorakit train` with sample.every: grids are written; rendered from embeddings encoded
    once when the text encoders are frozen, from the strings when they are trained."""
    calls: list[bool] = []
    render = sampling.render_cells

    def spy(pipe, spec, embeds=None):
        calls.append(embeds is not None)
        return render(pipe, spec, embeds)

    monkeypatch.setattr(sampling, "render_cells", spy)
    out = tmp_path / "run"
    te = f"lora.train_text_encoder={str(train_te).lower()}"
    cli("train", SAMPLES, *FAST, "--model", model, "--out", out, "--steps", 1,
        "--set", "sample.every=1", "--set", te)  # fmt: skip
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert grids == ["step-000000.png", "step-000001.png"]
    assert calls == [not train_te] * 2


def test_sample_phase_holds_the_text_encoders_only_when_resident():
    """Frozen text encoders (captions cached) are not brought back for previews; with tag
    shuffling they stay resident and the sample phase carries them."""
    frozen = planner.plan(cfg.resolve(preset="sd15-8gb", sets=["sample.every=100"]))
    resident = planner.plan(
        cfg.resolve(preset="sd15-8gb", sets=["sample.every=100", "data.shuffle_tags=true"])
    )
    _, modules = planner._counts("sd15", False)
    te_bytes = planner.weight_bytes(modules["text_encoder"], 2)  # fp16 preset
    vae_bytes = planner.weight_bytes(modules["vae"], 4)
    assert resident.phases["sample"] - frozen.phases["sample"] == te_bytes
    assert resident.phases["train"] - frozen.phases["train"] == te_bytes + vae_bytes


@pytest.mark.slow  # ~6 s: a real-architecture plan (the slow preset-fit test covers it too)
def test_flux_16gb_previews_fit_16gb():
    """The FLUX preset's previews no longer bring T5-XXL (8.9 GiB in bf16) back: the sample
    phase is below the caching phase and the preset fits 16 GiB with previews on."""
    c = cfg.resolve(preset="flux-16gb")
    assert c.sample.every > 0
    p = planner.plan(c)
    assert p.phases["sample"] < p.phases["cache"]
    assert p.phases["sample"] < 10 * planner.GIB
    assert p.fits(16)
    assert planner.propose(c, 16)[0] == []


def test_embeddings_for_an_unknown_pipeline_are_none():
    class Pipe:
        def encode_prompt(self, prompt):
            raise AssertionError("not called")

        def __call__(self, prompt=None):
            pass

    spec = grid_spec(SampleConfig(prompts=["a"], seeds=[0], steps=1), "", 64)
    assert encode_prompt_rows(Pipe(), spec) is None
