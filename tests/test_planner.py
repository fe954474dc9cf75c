"""`lorakit plan`: exact byte counts, the meta-device activation trace against real CPU passes,
proposals that fit the planner's own estimate, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit import config as cfg
from lorakit import planner
from tests.conftest import cli


def test_weight_bytes_by_dtype_and_quantization():
    m = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.LayerNorm(128))
    n_lin, n_other = 256 * 128, 128 + 2 * 128
    assert planner.weight_bytes(m, 2) == 2 * (n_lin + n_other)
    assert planner.weight_bytes(m, 4) == 4 * (n_lin + n_other)
    # NF4: 0.5 B codes + uint8 absmax per 64 + fp32 second-level absmax per 256 blocks + consts
    nf4 = n_lin // 2 + n_lin // 64 + 4 * 2 + 64
    assert planner.weight_bytes(m, 2, "nf4") == nf4 + 2 * n_other
    assert planner.weight_bytes(m, 2, "int8") == n_lin + 4 * 128 + 2 * n_other


def _state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for k, v in state.items():
            fresh = torch.is_tensor(v) and v.data_ptr() not in seen and not k.startswith("qmap")
            if fresh and k != "step" and v.numel() > 1:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_bytes_equal_the_real_optimizer_state(name):
    from lorakit.config import TrainConfig
    from lorakit.optim import build_optimizer

    params = [torch.nn.Parameter(torch.randn(s)) for s in ((16, 320), (320, 16), (8, 32), (7,))]
    opt = build_optimizer(params, TrainConfig(optimizer=name), torch.device("cpu"))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sizes = [p.numel() for p in params]
    assert planner.optimizer_bytes(sizes, name) == _state_bytes(opt)


def test_lora_count_equals_what_inject_lora_creates():
    from lorakit.config import LoraConfigSection
    from lorakit.lora import inject_lora
    from lorakit.models import get_family

    fam = get_family("sdxl")
    unet = fam.build_tiny().unet
    targets = list(fam.default_targets)
    predicted = sum(planner.lora_shapes(unet, targets, 8))
    params = inject_lora(unet, LoraConfigSection(rank=8, target_modules=targets), 0)
    assert predicted == sum(p.numel() for p in params) > 0


def test_real_architectures_have_the_published_sizes():
    counts = {
        f: sum(p.numel() for p in planner.build_denoiser(f).parameters()) for f in planner.ARCHS
    }
    assert 859e6 < counts["sd15"] < 860e6  # 859.5 M
    assert 2.56e9 < counts["sdxl"] < 2.57e9  # 2.567 B
    assert 8.0e9 < counts["sd3"] < 8.2e9  # SD3.5 large 8.1 B
    assert 11.8e9 < counts["flux"] < 12.0e9  # FLUX.1-dev 11.9 B
    t5 = planner.build_frozen("flux")["text_encoder_2"]
    assert 4.7e9 < sum(p.numel() for p in t5.parameters()) < 4.8e9


from test_planner_calibration import bench  # noqa: E402  (benchmarks/planner_cpu.py)

MID_UNET = bench.MID_UNET


@pytest.mark.parametrize("which", ["tiny", "mid"])
def test_meta_trace_matches_a_real_cpu_forward(which):
    """The planner's meta-device trace saves the same bytes as a real CPU pass (±15%)."""
    from diffusers import UNet2DConditionModel

    from lorakit.config import LoraConfigSection
    from lorakit.lora import inject_lora
    from lorakit.models.sd15 import TINY_UNET

    config = TINY_UNET if which == "tiny" else MID_UNET

    def measure(device: str) -> int:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
        unet.requires_grad_(False)
        inject_lora(unet, LoraConfigSection(rank=4, target_modules=["to_q", "to_v"]), 0)
        side, dim = 16, config["cross_attention_dim"]
        lat = torch.randn(2, 4, side, side, device=device)
        cond = {"encoder_hidden_states": torch.randn(2, 77, dim, device=device)}
        t = torch.tensor([10, 500], device=device)
        count = planner.count_saved(unet, "sd15", lat, t, cond, checkpointing=False)
        return count.retained

    real, meta = measure("cpu"), measure("meta")
    assert real > 0
    assert abs(meta - real) / real < 0.15, (meta, real)


def test_checkpointing_and_resolution_move_activations_the_right_way():
    args = ("fp16", ("to_q", "to_k", "to_v", "to_out.0"), 16)
    full = planner.step_activations("sd15", 512, 1, False, *args).activations
    ckpt = planner.step_activations("sd15", 512, 1, True, *args).activations
    small = planner.step_activations("sd15", 256, 1, True, *args).activations
    assert ckpt < 0.5 * full
    assert small < 0.5 * ckpt


def test_sd15_estimate_matches_the_h100_measurement():
    """benchmarks/gpu_check-h100-2026-11-26.json: real SD1.5 UNet, fp16, LoRA r16, 8-bit AdamW,
    512 px, batch 1, UNet only: 1.958 GiB (checkpointing) / 2.799 GiB (none)."""
    for ckpt, measured in ((True, 1.958), (False, 2.799)):
        c = cfg.resolve(
            preset="sd15-8gb",
            sets=["sample.every=0", f"train.gradient_checkpointing={str(ckpt).lower()}"],
        )
        p = planner.plan(c)
        assert abs(p.phases["train"] / planner.GIB - measured) / measured < 0.10


@pytest.mark.parametrize(
    ("preset", "sets", "vram"),
    [
        ("sd15", ["train.gradient_checkpointing=false", "train.optimizer='adamw'"], 4.0),
        ("sd15", ["train.batch_size=4", "train.mixed_precision='no'"], 6.0),
        pytest.param("flux-24gb", [], 16.0, marks=pytest.mark.slow),  # ~14 s of tracing
    ],
)
def test_proposals_fit_the_planners_own_estimate(preset, sets, vram):
    c = cfg.resolve(preset=preset, sets=sets)
    assert not planner.plan(c).fits(vram)
    proposal, _ = planner.propose(c, vram)
    assert proposal
    fixed = cfg.resolve(preset=preset, sets=sets + proposal)
    assert planner.plan(fixed).fits(vram)


@pytest.mark.slow  # ~7 s: plans every proposal step of an impossible target
def test_impossible_target_is_a_clear_error():
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match="No lorakit setting"):
        planner.propose(cfg.resolve(preset="sd15"), 0.5)


def test_plan_cli_json_and_table():
    res = cli(
        "plan", "--preset", "sd15", "--set", "train.optimizer='adamw'", "--vram", "3.0", "--json"
    )
    rep = json.loads(res.output)
    assert rep["family"] == "sd15" and rep["fits"] is False
    assert "train.optimizer='adamw8bit'" in rep["proposal"]
    table = cli("plan", "--preset", "sd15-8gb", "--vram", "80").output
    assert "verdict: fits in 80 GiB" in table and "denoiser weights" in table


def test_plan_cli_unknown_family_is_one_paragraph():
    res = cli("plan", "--set", "model.name=org/mystery", expect=2)
    assert "model.family" in res.output and "Traceback" not in res.output


def test_no_check_on_cpu_training():
    c = cfg.resolve(preset="flux-16gb")
    assert planner.check_before_training(c, torch.device("cpu"), strict=True) is None


@pytest.mark.slow  # ~7 s: graph capture; `train.compile` validation stays in the default tier
def test_compile_graph_capture_trains_two_steps(tmp_path):
    """`--set train.compile=true` through dynamo's graph capture of the real training step
    (backend eager: no code generation, ~20 s here; aot_eager ~100 s, inductor minutes — the
    slow test below); the adapter equals the uncompiled run's. One batch shape (no buckets):
    exactly one compiled frame, so the held-out scoring at steps 0 and 2 (eval, no grad) ran
    the plain module and did not compile a graph of its own."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tests.conftest import FAST, SAMPLES

    args = [SAMPLES, *FAST, "--steps", 2, "--set", "train.gradient_checkpointing=false",
            "--set", "data.bucketing=false"]  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    cli("train", *args, "--out", tmp_path / "c", "--set", "train.compile=true",
        "--set", "train.compile_backend='eager'")  # fmt: skip
    assert dict(counters["frames"]) == {"total": 1, "ok": 1}, dict(counters["frames"])
    cli("train", *args, "--out", tmp_path / "e")
    a = load_file(tmp_path / "c" / "lorakit.safetensors")
    b = load_file(tmp_path / "e" / "lorakit.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_compile_trains_two_steps(tmp_path):
    """torch.compile (inductor) of the tiny UNet takes minutes on 2 CPU cores: marked slow.
    Seen here: the run completed 2 steps and wrote both adapter files."""
    from tests.conftest import FAST, SAMPLES

    out = tmp_path / "r"
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 2, "--set", "train.compile=true")
    assert (out / "lorakit.safetensors").is_file()


@pytest.mark.slow  # ~12 s of real-width tracing
def test_offloaded_checkpoint_inputs_leave_the_predicted_peak():
    """`train.offload_activations`: the FLUX plan drops by what the simulated step no longer
    holds on the device (the 57 blocks' inputs, less the one unit brought back per recompute)."""
    sets = ["sample.every=0", "train.gradient_checkpointing=true"]
    on = planner.plan(
        cfg.resolve(preset="flux-16gb", sets=[*sets, "train.offload_activations=true"])
    )
    off = planner.plan(
        cfg.resolve(preset="flux-16gb", sets=[*sets, "train.offload_activations=false"])
    )
    c = cfg.resolve(preset="flux-16gb")
    args = ("flux", 1024, 1, True, "bf16", tuple(c.lora.target_modules), 16, 256, "nf4")
    plain = planner.step_activations(*args, False)
    held = planner.step_activations(*args, True)
    drop = off.phases["train"] - on.phases["train"]
    assert drop == plain.activations - held.activations
    assert drop > 1.3 * planner.GIB  # 57 blocks × [1, 4352, 3072] at least bf16


def test_offload_needs_checkpointing():
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="offload_activations"):
        cfg.resolve(sets=["train.offload_activations=true", "train.gradient_checkpointing=false"])


def _budgeted_presets() -> list[tuple[str, int]]:
    """Every shipped preset whose name ends in `-<N>gb`, with N; plus the two whose names carry
    no number (their budgets are stated in their headers)."""
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "presets"
    named = [
        (p.stem, int(m.group(1)))
        for p in sorted(folder.glob("*.toml"))
        if (m := re.search(r"-(\d+)gb$", p.stem))
    ]
    return [*named, ("sd15", 10), ("sd15-lowvram", 6)]


@pytest.mark.slow  # a few minutes: one plan per preset (real-width traces)
@pytest.mark.parametrize(("preset", "vram"), _budgeted_presets())
def test_every_preset_fits_the_budget_its_name_promises(preset, vram):
    p = planner.plan(cfg.resolve(preset=preset))
    assert p.fits(vram), f"{preset}: needs {p.needed / planner.GIB:.2f} GiB ({p.peak_phase})"


def test_presets_are_discovered_by_name():
    found = dict(_budgeted_presets())
    assert found["qwen-image-12gb"] == 12 and found["z-image-16gb"] == 16
    assert found["flux2-klein-24gb"] == 24 and "tiny-cpu" not in found


@pytest.mark.parametrize("preset", ["sd15", "z-image-12gb"])
def test_streamed_encoders_drop_the_cache_phase_by_all_but_one_layer(preset):
    """`train.stream_encoders`: the caching phase keeps each text encoder's resident parts and
    ONE layer of its largest ModuleList; the other phases are unchanged."""
    from lorakit.spec import WEIGHT_DTYPES, frozen_dtype

    base = cfg.resolve(preset=preset, sets=["train.stream_encoders=false"])
    streamed = cfg.resolve(preset=preset, sets=["train.stream_encoders=true"])
    a, b = planner.plan(base), planner.plan(streamed)
    _, frozen = planner._counts(planner.planner_key(base), base.model.drop_t5)
    dtype = WEIGHT_DTYPES[base.train.mixed_precision]
    drop = 0
    for name, m in frozen.items():
        if name == "vae":
            continue
        eb = frozen_dtype(name, m, dtype, bf16_supported=True).itemsize
        layers = max(
            (x for x in m.modules() if isinstance(x, torch.nn.ModuleList)),
            key=lambda x: planner.weight_bytes(x, eb),
        )
        sizes = [planner.weight_bytes(layer, eb) for layer in layers]
        assert len(sizes) > 1 and sum(sizes) > planner.weight_bytes(m, eb) / 2
        drop += sum(sizes) - max(sizes)
    assert a.phases["cache"] - b.phases["cache"] == drop > 0
    assert a.phases["train"] == b.phases["train"]
    assert "train.stream_encoders = true" in planner.table(b, None)


@pytest.mark.slow  # ~9 s; the cache-phase count is checked in the default tier above
def test_plan_proposes_streamed_encoders_right_after_offloading():
    """Before block swap, batch or resolution: it costs caching speed only."""
    c = cfg.resolve(preset="qwen-image-16gb", sets=["train.stream_encoders=false"])
    assert not planner.plan(c).fits(16)
    sets, fitted = planner.propose(c, 16)
    assert sets == ["train.stream_encoders=true"] and fitted.fits(16)
    steps = [d for d, _ in planner._steps(c, planner.planner_key(c))]
    assert steps.index("text encoders streamed while caching") == 0  # offloading already on
    c2 = cfg.resolve(preset="sd15", sets=["lora.train_text_encoder=true"])
    steps = [d for d, _ in planner._steps(c2, planner.planner_key(c2))]
    after = steps.index("cached text-encoder outputs (encoders off the device)")
    assert steps[after + 1] == "text encoders streamed while caching"
