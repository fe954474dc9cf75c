"""EMA of the adapter weights: the update rule, the exported EMA/raw pair, previews and held-out
scores on the EMA weights, bit-identical resume (a damaged checkpoint passed over), and post-hoc
EMA over a run's checkpoints (`lorakit ema`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from safetensors.torch import load_file

from lorakit import checkpoint as ckpt
from lorakit.ema import AdapterEMA, posthoc_weights, sigma_rel_to_gamma, warmup_decay
from lorakit.models import FAMILIES

DECAY = 0.9
STEPS = 4
EMA = [*FAST, "--steps", STEPS, "--set", "train.ema=true", "--set", f"train.ema_decay={DECAY}",
       "--set", "train.save_every=1", "--set", "train.keep_last=0",
       "--set", "eval.palette_colors=0", "--set", f"eval.every={STEPS}",
       "--set", "export.formats=['kohya']"]  # fmt: skip


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _same(a: Path, b: Path) -> None:
    x, y = _tensors(a), _tensors(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), k


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """4 steps with train.ema, a checkpoint every step, previews at steps 0 and 4; every preview
    records the LoRA weights the denoiser held while it rendered."""
    import lorakit.train as train_mod
    from lorakit.lora import extract_adapter

    out = tmp_path_factory.mktemp("ema") / "run"
    seen = {}
    real = train_mod.preview

    def recording(family, comps, *args, **kwargs):
        seen[args[4]] = extract_adapter(family, comps)  # args[4]: the step
        return real(family, comps, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "preview", recording)
        cli("train", SAMPLES, *EMA, "--out", out, "--set", f"sample.every={STEPS}",
            "--set", "sample.seeds=[0]", "--set", "sample.prompts=['a tdwl logo']")  # fmt: skip
    return out, seen


def test_update_rule_warm_up_and_exact_swap():
    assert warmup_decay(0.999, 1) == pytest.approx(0.1)  # diffusers: (1 + 0) / (10 + 0)
    assert warmup_decay(0.999, 891) == pytest.approx(0.99)
    assert warmup_decay(0.9, 1000) == 0.9
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    init = [t.clone() for t in p]
    ema = AdapterEMA(p, 0.95)
    cpu = AdapterEMA(p, 0.95, device="cpu")
    expected = [t.double() for t in init]
    for t in range(1, 40):
        for x in p:
            x.add_(torch.randn(x.shape, generator=gen))
        ema.update()
        cpu.update()
        d = min(0.95, t / (t + 9))
        expected = [d * e + (1 - d) * x.double() for e, x in zip(expected, p, strict=True)]
    assert ema.updates == 39
    for s, c, e in zip(ema.shadow, cpu.shadow, expected, strict=True):
        assert torch.equal(s, c)
        assert torch.allclose(s.double(), e, atol=1e-5), (s - e).abs().max()
    raw = [x.clone() for x in p]
    with pytest.raises(RuntimeError), ema.applied():
        assert all(torch.equal(x, s) for x, s in zip(p, ema.shadow, strict=True))
        raise RuntimeError("a failing preview")
    assert all(torch.equal(x, r) for x, r in zip(p, raw, strict=True)), "raw weights back exactly"
    again = AdapterEMA(p, 0.95)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 39 and all(
        torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow, strict=True)
    )


def test_the_main_adapter_is_the_ema_of_the_raw_one_step_by_step(ema_run):
    """Each checkpoint's main adapter = d_t · previous main + (1 - d_t) · its raw adapter, with
    the documented warm-up d_t = min(decay, t / (t + 9)); the final files equal the last ones."""
    out, _ = ema_run
    main = {s: _tensors(f / "lorakit.safetensors") for s, f in ckpt.complete_checkpoints(out)}
    raw = {
        s: _tensors(f / "raw" / "lorakit.safetensors") for s, f in ckpt.complete_checkpoints(out)
    }
    assert sorted(main) == [1, 2, 3, 4]
    moved = 0.0
    for t in (2, 3, 4):
        d = min(DECAY, t / (t + 9))
        for k, v in main[t].items():
            if k.endswith(".alpha"):
                continue
            expected = torch.lerp(main[t - 1][k], raw[t][k], 1 - d)
            assert torch.allclose(v, expected, rtol=0, atol=1e-7), (t, k)
            moved = max(moved, (v - raw[t][k]).abs().max().item())
    assert moved > 1e-5, "the EMA differs from the raw weights"
    state = ckpt.load_state(ckpt.step_dir(out, 4))
    assert state.ema["updates"] == 4 and state.ema["decay"] == DECAY
    _same(out / "lorakit.safetensors", ckpt.step_dir(out, 4) / "lorakit.safetensors")
    _same(
        out / "raw" / "lorakit.safetensors", ckpt.step_dir(out, 4) / "raw" / "lorakit.safetensors"
    )


def test_previews_and_heldout_scores_use_the_ema_weights(ema_run):
    from lorakit import config as cfg
    from lorakit.ema import _Scorer
    from lorakit.export import read_adapter

    out, seen = ema_run
    main, _ = read_adapter(out / "lorakit.safetensors")
    raw, _ = read_adapter(out / "raw" / "lorakit.safetensors")
    previewed = seen[STEPS]
    for key, w in main.modules.items():
        assert torch.equal(previewed.modules[key].up, w.up), key
        assert torch.equal(previewed.modules[key].down, w.down), key
    assert any(not torch.equal(previewed.modules[k].up, w.up) for k, w in raw.modules.items())
    # the score training recorded for the last step is the main (EMA) adapter's, computed
    # again from the file by `lorakit ema`'s scorer; the raw adapter scores otherwise
    history = json.loads((out / "report.json").read_text())["history"]
    final = [r["heldout"] for r in history["checkpoints"] if r["step"] == STEPS]
    c = cfg.build(cfg.check_layer(cfg.read_toml(out / "config.toml", "run"), "run"))
    c.train.out = str(out)
    scorer = _Scorer.build(c, out, None)
    assert scorer.ready, scorer.problem
    ema_score, raw_score = scorer.score(main), scorer.score(raw)
    assert final and all(v == pytest.approx(ema_score, rel=1e-6, abs=1e-7) for v in final)
    assert abs(raw_score - ema_score) > 1e-6


def _break_ema_in_state(folder: Path) -> None:
    """Flip one byte inside the EMA's tensors of a checkpoint's state.safetensors."""
    path = folder / "state.safetensors"
    data = bytearray(path.read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    begin = next(v["data_offsets"][0] for k, v in header.items() if k.startswith("ema"))
    data[8 + int.from_bytes(data[:8], "little") + begin] ^= 0xFF
    path.write_bytes(bytes(data))


def test_interrupted_run_resumes_bit_identically_past_a_damaged_ema(ema_run, tmp_path):
    """Killed after checkpoint 3 whose EMA was then damaged on disk: `--resume latest` passes
    over it to checkpoint 2, and the EMA and raw adapters equal the uninterrupted run's."""
    straight, _ = ema_run
    out = tmp_path / "run"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("samples"))
    for name in ("lorakit.safetensors", "raw", "report.json", "run.json"):  # not finished
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    shutil.rmtree(ckpt.step_dir(out, 4))
    _break_ema_in_state(ckpt.step_dir(out, 3))
    r = cli("train", SAMPLES, *EMA, "--out", out, "--resume", "latest")
    text = "".join(r.output.split())
    assert "step-000003'isdamaged" in text and f"resumingfrom{ckpt.step_dir(out, 2)}" in text
    _same(straight / "lorakit.safetensors", out / "lorakit.safetensors")
    _same(straight / "raw" / "lorakit.safetensors", out / "raw" / "lorakit.safetensors")
    a = ckpt.load_state(ckpt.step_dir(straight, 4)).ema["shadow"]
    b = ckpt.load_state(ckpt.step_dir(out, 4)).ema["shadow"]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resume_refuses_to_switch_ema_off(ema_run):
    out, _ = ema_run
    off = [a if a != "train.ema=true" else "train.ema=false" for a in EMA]
    r = cli("train", SAMPLES, *off, "--out", out, "--steps", 6, "--resume", "latest", expect=2)
    text = " ".join(r.output.split())
    assert "train.ema (True → False)" in text and "Traceback" not in text, text


def test_posthoc_weights_match_the_step_gaps_and_musubis_power_profile():
    assert posthoc_weights([10, 20, 40], decay=0.9) == pytest.approx(
        [0.9**30, (1 - 0.9**10) * 0.9**20, 1 - 0.9**20]
    )
    g = sigma_rel_to_gamma(0.1)
    assert g == pytest.approx(6.94, abs=0.01)  # EDM2: σ_rel 0.10 ↔ γ 6.94, 0.05 ↔ 16.97
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    # musubi-tuner's loop over files f0..f4 (t = 1, 2, … from its second file) on unit
    # vectors gives each file's weight; lorakit with checkpoints at steps 1..4 = f1..f4
    files = torch.eye(5, dtype=torch.float64)
    state = files[0].clone()
    for i, f in enumerate(files[1:]):
        beta = (1 - 1 / (i + 1)) ** (g + 1)
        state = state * beta + f * (1 - beta)
    assert posthoc_weights([1, 2, 3, 4], sigma_rel=0.1) == pytest.approx(state[1:].tolist())
    for w in (posthoc_weights([3, 5, 6, 9], decay=0.5), posthoc_weights([3, 9], sigma_rel=0.2)):
        assert sum(w) == pytest.approx(1.0)


def test_lorakit_ema_averages_scores_and_reports(ema_run, tmp_path):
    straight, _ = ema_run
    out = tmp_path / "run"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("samples"))
    r = cli("ema", out, "--decay", 0.5)
    steps = [1, 2, 3, 4]
    w = [0.5**3] + [(1 - 0.5) * 0.5 ** (4 - s) for s in steps[1:]]  # closed form, gaps of 1
    assert "step 1: 0.125, step 2: 0.125, step 3: 0.250, step 4: 0.500" in r.output
    made = _tensors(out / "ema" / "decay-0.5" / "lorakit.safetensors")
    raws = [_tensors(ckpt.step_dir(out, s) / "raw" / "lorakit.safetensors") for s in steps]
    for k, v in made.items():
        expected = (
            raws[0][k]
            if k.endswith(".alpha")
            else sum(x * r[k] for x, r in zip(w, raws, strict=True))
        )
        assert torch.allclose(v, expected, atol=1e-7), k
    rows = json.loads((out / "report.json").read_text())["history"]["checkpoints"]
    row = [x for x in rows if x.get("label")]
    assert len(row) == 1 and row[0]["step"] == 4 and math.isfinite(row[0]["heldout"])
    assert f"held-out loss: {row[0]['heldout']:.6g}" in r.output
    html = (out / "report.html").read_text()
    assert "post-hoc EMA, decay 0.5, checkpoints 1–4" in html
    before = (out / "ema" / "decay-0.5" / "lorakit.safetensors").read_bytes()
    r = cli("ema", out, "--decay", 0.5, expect=1)
    assert "--overwrite" in r.output and "Traceback" not in r.output
    assert (out / "ema" / "decay-0.5" / "lorakit.safetensors").read_bytes() == before
    cli("ema", out, "--decay", 0.5, "--overwrite")
    rows = json.loads((out / "report.json").read_text())["history"]["checkpoints"]
    assert len([x for x in rows if x.get("label")]) == 1, "replaced, not added twice"
    assert not list((out / "ema").glob(".*")), "no partial or old folder left"


def test_lorakit_ema_refusals_write_nothing(ema_run, tmp_path):
    straight, _ = ema_run
    out = tmp_path / "run"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("samples", "cache"))
    (out / "report.json").unlink()  # and the data folder unknown: written, not scored
    for args, says in (
        (["--decay", 1.5], "--decay 1.5 must be in (0, 1)"),
        (["--sigma-rel", 0.5], "--sigma-rel 0.5 is outside"),
        ([], "exactly one of --decay and --sigma-rel"),
    ):
        r = cli("ema", out, *args, expect=1)
        assert says in " ".join(r.output.split()) and "Traceback" not in r.output
        assert not (out / "ema").exists()
    for s in (2, 3, 4):
        shutil.rmtree(ckpt.step_dir(out, s)) if s != 3 else _break_ema_in_state(
            ckpt.step_dir(out, s)
        )
    r = cli("ema", out, "--decay", 0.9, expect=1)
    text = " ".join(r.output.split())
    assert "1 usable checkpoint(s)" in text and "step-000003" in text and "train.keep_last" in text
    assert not (out / "ema").exists()
    shutil.copytree(ckpt.step_dir(straight, 4), ckpt.step_dir(out, 4))
    r = cli("ema", out, "--decay", 0.9)
    assert "not scored" in r.output and "--data" in r.output and "report not updated" in r.output
    assert (out / "ema" / "decay-0.9" / "lorakit.safetensors").is_file()
    edited = tmp_path / "edited"
    shutil.copytree(SAMPLES, edited)
    (edited / "tidewell_01.txt").write_text("another caption")
    r = cli("ema", out, "--decay", 0.9, "--overwrite", "--data", edited)
    assert "differs from the one the run trained on" in " ".join(r.output.split())


def test_ema_config_keys_are_documented_and_checked():
    r = cli("config", "--keys")
    for key in ("train.ema", "train.ema_decay", "train.ema_device"):
        assert key in r.output
    r = cli("config", "--preset", "tiny-cpu", "--set", "train.ema_decay=1.0", expect=2)
    assert "train.ema_decay" in r.output and "(0, 1)" in r.output


@pytest.mark.slow  # three runs of two processes each, ~2 min per case on 2 cores
@pytest.mark.parametrize("setup", ["ddp", "fsdp"])
def test_two_processes_keep_the_ema_and_resume_it_exactly(setup, tmp_path):
    """Every rank updates the EMA of what it holds (DDP: whole tensors; FSDP: its shard): the
    2-process EMA and raw adapters equal one process's at the same global batch, and a run
    killed after a checkpoint and resumed gives bit-identical ones."""
    from conftest import finish, kill_and_resume, launch_train
    from test_sharded import _cpu_config

    extra = [] if setup == "ddp" else ["--accelerate-config", _cpu_config(tmp_path, "fsdp.yaml")]

    def launch(out: Path, *args):
        return launch_train(SAMPLES, *EMA, "--steps", 8, "--out", out, "--set",
                            "train.batch_size=1", "--num-processes", 2, *extra, *args)  # fmt: skip

    proc = launch(tmp_path / "straight")
    text = finish(proc)
    assert proc.returncode == 0, text
    out = tmp_path / "run"
    kill_and_resume(lambda *args: launch(out, *args), out, 2, 8)
    one = tmp_path / "one"
    cli("train", SAMPLES, *EMA, "--steps", 8, "--out", one, "--set", "train.batch_size=2")
    for name in ("lorakit.safetensors", "raw/lorakit.safetensors"):
        _same(tmp_path / "straight" / name, out / name)
        a, b = _tensors(out / name), _tensors(one / name)
        # not bit-exact: the ranks' gradients are averaged by an all-reduce, not in one loss
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_exports_the_ema_it_applies(name):
    """Generic over the registry: after two optimizer steps on a family's own loss, the model
    runs on the EMA shadows inside `applied` (so previews, scores and `extract_adapter` see
    them: the exported adapter differs from the raw one), and the raw weights come back bit for
    bit afterwards."""
    from lorakit.config import LoraConfigSection, TrainConfig
    from lorakit.lora import extract_adapter, inject_lora

    fam = FAMILIES[name]
    comps = fam.build_tiny(seed=0)
    den = getattr(comps, fam.denoiser_name)
    params = inject_lora(den, LoraConfigSection(rank=2, alpha=2.0), seed=0)
    ema = AdapterEMA(params, 0.5)
    opt = torch.optim.SGD(params, lr=0.1)
    res = fam.tiny_resolution
    lat = fam.encode_images(comps, torch.zeros(1, 3, res, res))
    cond = fam.encode_prompts(comps, ["tdwl cup"])
    cond.update(fam.image_conditioning(comps, (res, res), (0, 0), (res, res)))
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        noise, t = fam.noise_and_timesteps(comps, lat, gen, TrainConfig())
        fam.loss(comps, den, lat, cond, noise, t, TrainConfig()).backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    raw = [p.detach().clone() for p in params]
    plain = extract_adapter(fam, comps)
    with ema.applied():
        averaged = extract_adapter(fam, comps)
        inside = [p.detach().clone() for p in params]
    assert all(torch.equal(p, r) for p, r in zip(params, raw, strict=True)), name
    assert all(torch.equal(a, s) for a, s in zip(inside, ema.shadow, strict=True)), name
    assert averaged.modules.keys() == plain.modules.keys()
    assert any(
        not torch.equal(averaged.modules[k].up, plain.modules[k].up) for k in plain.modules
    ), name
