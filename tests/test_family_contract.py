"""The path every registered family must walk, through the real CLI, on its tiny model.

Parametrized over `FAMILIES`: registering a family puts it under this test. Per family, at the
smallest shapes: `prepare` (no model named) then `train` on that set at a resolution whose
buckets are not all square, 2 steps with text-encoder LoRA (where the family has CLIP encoders;
the others must refuse the key in one paragraph) and a preview grid, and 2 steps
without it, whose diffusers file `load_lora_weights` loads into the family's own pipeline to
reproduce the trained denoiser (≤ 1e-5) and which `merge` fuses into the base (with
`--single-file` where the family has one); every export format written and read back; `inspect`
of each file (text encoders through diffusers: `tests/test_text_encoder_lora.py`, also over the
registry). Slow tier: `plan` (it traces the real architecture).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit import config as cfg
from lorakit.export import read_adapter
from lorakit.lora import text_encoder_targets
from lorakit.merge import merge_into
from lorakit.models import FAMILIES
from lorakit.models.base import Family

LORAKIT = Path(__file__).resolve().parents[1] / "lorakit"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "set"
    cli("prepare", SAMPLES, out, "--set", "data.resolution=64")
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_walks_the_whole_path(family, prepared, tmp_path):
    buckets = json.loads((prepared / "report.json").read_text())["buckets"]
    assert any(w != h for w, h in (b.split("x") for b in buckets)), "needs non-square buckets"
    fam = FAMILIES[family]
    # text-encoder LoRA where the family offers one (CLIP encoders); a family whose encoders are
    # LLMs/T5 (Qwen-Image, FLUX.2, Z-Image) must refuse the key in one paragraph instead
    te = bool(text_encoder_targets(fam, fam.build_tiny(seed=0)))
    run = tmp_path / "run"
    if not te:
        r = cli(
            "train", prepared, *FAST, "--model", f"tiny:{family}", "--steps", 2,
            "--out", tmp_path / "refused", "--set", "lora.train_text_encoder=true", expect=2,
        )  # fmt: skip
        assert "lora.train_text_encoder = false" in r.output and "Traceback" not in r.output
        assert not (tmp_path / "refused" / "lorakit.safetensors").exists()
    cli(
        "train", prepared, *FAST, "--model", f"tiny:{family}", "--steps", 2, "--out", run,
        "--set", "data.resolution=64", "--set", f"lora.train_text_encoder={str(te).lower()}",
        "--set", "sample.every=2", "--set", "train.batch_size=1",
    )  # fmt: skip
    assert sorted(p.name for p in (run / "samples").glob("*.png")), "preview grids"
    cli("export", run, "--format", "all", "--out", tmp_path / "x")
    files = sorted((tmp_path / "x").rglob("*.safetensors"))
    assert len(files) == 3, files  # kohya, lycoris, diffusers: a LoRA fits every format
    for f in files:
        adapter, _ = read_adapter(f)
        assert adapter.family == family, f
        comps = {comp for comp, _ in adapter.modules}
        assert (comps != {fam.denoiser_name}) == te, f"{f.name}: text-encoder LoRA {comps}"
        r = cli("inspect", f)
        assert f"family:      {family}" in r.output, r.output


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_without_text_encoder_lora(family, prepared, tmp_path):
    """The same prepared set, 2 steps, the denoiser alone: only denoiser modules exported."""
    run = tmp_path / "run"
    cli(
        "train", prepared, *FAST, "--model", f"tiny:{family}", "--steps", 2, "--out", run,
        "--set", "data.resolution=64", "--set", "train.batch_size=1", "--lr", 5e-3,
    )  # fmt: skip
    adapter, _ = read_adapter(run / "lorakit.safetensors")
    assert adapter.family == family and adapter.modules
    fam = FAMILIES[family]
    assert {comp for comp, _ in adapter.modules} == {fam.denoiser_name}
    # diffusers' own `load_lora_weights` of the exported diffusers file reproduces the trained
    # denoiser: the same output as the base with lorakit's ΔW (from the kohya file) merged in
    expected = fam.build_tiny(seed=0)
    merge_into(fam, expected, [(adapter, 1.0)])
    loaded, base = fam.build_tiny(seed=0), fam.build_tiny(seed=0)
    fam.pipeline(loaded).load_lora_weights(str(run / "diffusers/pytorch_lora_weights.safetensors"))
    want, got, before = (_denoised(fam, comps) for comps in (expected, loaded, base))
    assert (got - want).abs().max().item() <= 1e-5
    assert (want - before).abs().max().item() > 1e-4, "the trained LoRA changes the output"
    # `merge` into the base (with `--single-file` where the family has one)
    single = fam.single_file_configs() is not None
    merged = tmp_path / "merged"
    cli(
        "merge", run / "lorakit.safetensors", "--base", f"tiny:{family}", "--out", merged,
        *(["--single-file"] if single else []),
    )  # fmt: skip
    assert (merged / "model_index.json").is_file()
    assert not single or (tmp_path / "merged.safetensors").is_file()


@torch.no_grad()
def _denoised(fam, comps) -> torch.Tensor:
    """The denoiser's output on fixed seeded inputs (latents, noise, timesteps, prompts)."""
    den = getattr(comps, fam.denoiser_name)
    den.eval()
    prompts = ["tdwl coffee cup", "a sun over the sea"]
    cond = fam.encode_prompts(comps, prompts)
    for k, v in fam.image_conditioning(comps, (64, 64), (0, 0), (64, 64)).items():
        cond[k] = torch.cat([v] * len(prompts))
    g = torch.Generator().manual_seed(5)
    latents = fam.encode_images(comps, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1)
    x, t = fam.noise_and_timesteps(comps, latents, g, cfg.resolve(preset="tiny-cpu").train)
    return fam.predict(den, x, t, cond)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_plans(family):
    """`plan` traces the family's REAL architecture on the meta device (~10 s per family)."""
    r = cli("plan", "--preset", "tiny-cpu", "--set", f"model.name='tiny:{family}'")
    assert "training plan" in r.output


# --- the contract, statically: declared members, no family names outside models/, no family
# --- importing another ---------------------------------------------------------------------------


def _protocol_members() -> dict[str, bool]:
    """Member name → whether it is a method, for every member `base.Family` declares."""
    members = {name: False for name in inspect.get_annotations(Family)}
    for name, value in vars(Family).items():
        if not name.startswith("_") and callable(value):
            members[name] = True
    return members


def test_the_protocol_declares_members():
    members = _protocol_members()
    assert {"name", "load_configured", "build_real_denoiser", "planner_inputs"} <= set(members)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_has_every_declared_member(family):
    """Every member of the `Family` Protocol (attributes and methods) exists on the family, so
    generic code reads them directly (no getattr with a default)."""
    fam = FAMILIES[family]
    missing = [m for m in _protocol_members() if not hasattr(fam, m)]
    assert not missing, f"{family} lacks the Family members {missing} (lorakit/models/base.py)"
    not_callable = [m for m, is_method in _protocol_members().items()
                    if is_method and not callable(getattr(fam, m))]  # fmt: skip
    assert not not_callable, f"{family}: {not_callable} must be methods"
    assert fam.name == family


_FAMILY_WORD = re.compile(
    "(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, FAMILIES)) + ")(?![A-Za-z0-9_])"
)
# (file relative to lorakit/, substring of the flagged string): help and example texts.
ALLOWED_MENTIONS = {
    ("cli.py", "tiny:sd15"),
    ("cli.py", "e.g. sd15"),
    ("sampling.py", "--base tiny:sd15"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of string constants that are bare expression statements (docstrings, attribute
    docs): prose, not code."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def _family_mentions(path: Path) -> list[tuple[int, str]]:
    """(line, text) of identifiers, imported module names and string literals (docstrings and
    comments excluded) that are a registered family's name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        texts: list[str] = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts = [] if id(node) in docs else [node.value]
        elif isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, ast.ImportFrom):
            texts = [node.module or "", *(a.name for a in node.names)]
        elif isinstance(node, ast.Import):
            texts = [a.name for a in node.names]
        found += [(node.lineno, t) for t in texts if _FAMILY_WORD.search(t)]
    return found


def test_generic_code_names_no_family():
    """Outside `lorakit/models/`, code reaches a family through the registry and its members:
    no `== "flux"`, no `"sdxl"` table keys, no `models.sd3` imports. Help and example texts are
    allowed by `ALLOWED_MENTIONS`."""
    offenders = []
    for path in sorted(LORAKIT.rglob("*.py")):
        rel = path.relative_to(LORAKIT).as_posix()
        if rel.startswith("models/"):
            continue
        for line, text in _family_mentions(path):
            if not any(f == rel and pattern in text for f, pattern in ALLOWED_MENTIONS):
                offenders.append(f"lorakit/{rel}:{line}: {text[:80]!r}")
    assert not offenders, (
        "Generic code names model families (declare the fact as a Family member in "
        "lorakit/models/base.py and read it from the family object):\n" + "\n".join(offenders)
    )


def _family_package(fam) -> str:
    return type(fam).__module__  # lorakit.models.<folder>


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every module (and `from` name) a file imports, function-local
    and relative imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def test_no_family_imports_another_family():
    """A family folder imports shared modules (`models/ddpm.py`, `flow.py`, `text_encoders.py`,
    `vae.py`, `loading.py`, `base.py`), never another family; shared modules import no family."""
    packages = {_family_package(f) for f in FAMILIES.values()}
    models = LORAKIT / "models"
    offenders = []
    for path in sorted(models.rglob("*.py")):
        rel = path.relative_to(models)
        if rel.as_posix() == "__init__.py":
            continue  # the registry imports every family
        own = f"lorakit.models.{rel.parts[0]}" if len(rel.parts) > 1 else None
        package = ".".join(["lorakit", "models", *rel.parts[:-1]])
        for line, name in _imports(path, package):
            for other in packages - {own}:
                if name == other or name.startswith(other + "."):
                    offenders.append(f"lorakit/models/{rel.as_posix()}:{line}: imports {name}")
    assert not offenders, "\n".join(offenders)
