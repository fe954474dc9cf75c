"""Single-file checkpoints (`model.safetensors` as downloaded from model sites), for any family.

API (what `models/__init__.py` and the family modules call):

- `load_single_file(family, path, config_source="") -> components` — the entry point. Reads the
  file (safetensors only), checks it is a `family` checkpoint, and calls
  `family.from_single_file(checkpoint, folder, source)` with `folder` = `config_source` (a local
  diffusers folder of the same architecture: configs and tokenizers come from there) or, when
  empty, a temp folder holding the family's built-in REAL configs (`family.single_file_configs()`).
  Never touches the network.
- `detect_family(path) -> str | None` — the family of a checkpoint from its key names alone
  (`MARKERS`; only the header is read).
- Helpers for `family.from_single_file`: `load_component` (diffusers models and CLIP text encoders
  converted from ldm/SGM keys by diffusers' own converters), `load_tokenizer`, `load_scheduler`.

Checkpoints keep the original key layout: `model.diffusion_model.` (UNet), `first_stage_model.`
(VAE), `cond_stage_model.transformer.` (SD1.5 CLIP-L), `conditioner.embedders.0.transformer.` /
`conditioner.embedders.1.model.` (SDXL CLIP-L / OpenCLIP bigG). SD3/3.5: `joint_blocks.*` (MMDiT,
optionally under `model.diffusion_model.`) plus an optional `first_stage_model.` VAE; FLUX.1:
`double_blocks.*` / `single_blocks.*` (BFL layout, usually the transformer alone). For SD3/FLUX
only the transformer (and the VAE when present) is read from the file; text encoders, tokenizers
and scheduler come from `model.single_file_config` (`load_from_folder`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.models.base import Family

# Family → key prefixes that identify its checkpoints. Checked in order (first match wins), so a
# family whose keys contain another's (SDXL has a UNet like SD1.5) comes first.
MARKERS: dict[str, tuple[str, ...]] = {
    "sdxl": ("conditioner.embedders.1.model.",),
    "sd15": ("cond_stage_model.transformer.text_model.",),
    # SD3/3.5 and FLUX.1 files ship with or without the `model.diffusion_model.` prefix.
    "sd3": ("joint_blocks.", "model.diffusion_model.joint_blocks."),
    "flux": ("double_blocks.", "model.diffusion_model.double_blocks."),
}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def check_suffix(path: Path) -> None:
    """Refuse anything but `.safetensors` with one clear paragraph."""
    if path.suffix.lower() == ".safetensors":
        return
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LorakitError(
            f"model.name '{path}' is a pickled checkpoint ({path.suffix}). lorakit reads "
            "single-file checkpoints only as .safetensors, because loading a pickle can run code "
            "from the file. Download the .safetensors version of the model, or convert the file "
            "once in an environment you trust."
        )
    raise LorakitError(
        f"model.name '{path}' is a file but not a .safetensors checkpoint. Pass a single-file "
        "checkpoint (.safetensors), a diffusers folder (with model_index.json), a hub id or "
        "tiny:FAMILY."
    )


def checkpoint_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    check_suffix(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise LorakitError(
            f"model.name '{path}' is not a readable safetensors checkpoint ({_first_line(e)}). "
            "Check that the download finished, or download it again."
        ) from None


def detect_family(path: str | Path) -> str | None:
    """Family name from the checkpoint's key names, or None if no family matches."""
    keys = checkpoint_keys(Path(path))
    for family, prefixes in MARKERS.items():
        if any(k.startswith(prefixes) for k in keys):
            return family
    return None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    checkpoint_keys(path)  # suffix and readability checks with clear messages
    return load_file(str(path))


@contextlib.contextmanager
def config_folder(family: Family, config_source: str) -> Iterator[str]:
    """The folder diffusers reads configs from: the user's folder, or the built-in real configs."""
    if config_source:
        folder = Path(config_source).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"model.single_file_config '{config_source}' is not a folder. Point it at a local "
                f"diffusers folder of a {family.name} model (with unet/, vae/, text_encoder/, "
                "tokenizer/ …), or leave it empty to use lorakit's built-in configs."
            )
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix=f"lorakit-{family.name}-config-") as tmp:
        for sub, config in family.single_file_configs().items():
            name = "scheduler_config.json" if sub == "scheduler" else "config.json"
            (Path(tmp) / sub).mkdir()
            (Path(tmp) / sub / name).write_text(json.dumps(config, indent=2), encoding="utf-8")
        yield tmp


def load_single_file(family: Family, path: str | Path, config_source: str = "") -> Any:
    """Components of `family` from a single-file `.safetensors` checkpoint (see module doc)."""
    path = Path(path).expanduser()
    found = detect_family(path)
    if found is not None and found != family.name:
        raise ConfigError(
            f"model.name '{path}' is a {found} checkpoint, but model.family is '{family.name}'. "
            f"Set model.family = '{found}' (or 'auto')."
        )
    checkpoint = read_checkpoint(path)
    with config_folder(family, config_source) as folder:
        return family.from_single_file(checkpoint, folder, str(path))


# -- helpers for Family.from_single_file -----------------------------------------------------------


def load_component(cls: type, checkpoint: dict[str, torch.Tensor], folder: str, sub: str, src: str):
    """One model of the checkpoint, converted with diffusers' converters, config from
    `folder/sub`, fp32, eval mode. Raises if a weight the config needs is not in the file."""
    from diffusers import FromOriginalModelMixin

    try:
        if issubclass(cls, FromOriginalModelMixin):
            model = cls.from_single_file(
                checkpoint,
                config=folder,
                subfolder=sub,
                local_files_only=True,
                torch_dtype=torch.float32,
            )
        else:  # transformers CLIP text encoders
            from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

            model = create_diffusers_clip_model_from_ldm(
                cls,
                checkpoint,
                subfolder=sub,
                config=folder,
                torch_dtype=torch.float32,
                local_files_only=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LorakitError(
            f"Could not read the {sub} from the checkpoint '{src}': {_first_line(e)}. The file "
            f"and the configs in {folder} must describe the same architecture; if the model is "
            "not a standard one, pass its diffusers folder as model.single_file_config."
        ) from None
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LorakitError(
            f"The checkpoint '{src}' lacks {len(missing)} weights of the {sub} "
            f"({', '.join(missing[:3])} …). It is not a complete model of this family (a UNet-only "
            "or a pruned file?): use a full checkpoint or a diffusers folder."
        )
    model.requires_grad_(False)
    model.eval()
    return model


def load_tokenizer(folder: str, sub: str, hub_repo: str, src: str):
    """A CLIP tokenizer from `folder/sub`, else from the local Hugging Face cache of `hub_repo`
    (never downloaded), else a clear error asking for model.single_file_config."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import CLIPTokenizer

    # Only folders that really hold the vocabulary: transformers 5 returns a 2-token tokenizer
    # instead of failing when the files are missing.
    candidates = [Path(folder) / sub]
    for name in ("tokenizer.json", "vocab.json"):
        cached = try_to_load_from_cache(hub_repo, f"{sub}/{name}")
        if isinstance(cached, str):
            candidates.append(Path(cached).parent)
    for where in candidates:
        if (where / "tokenizer.json").is_file() or (
            (where / "vocab.json").is_file() and (where / "merges.txt").is_file()
        ):
            return CLIPTokenizer.from_pretrained(str(where))
    raise LorakitError(
        f"The single-file checkpoint '{src}' has no tokenizer in it (no checkpoint does), and "
        f"no '{sub}' was found in a model.single_file_config folder nor in the local Hugging "
        f"Face cache of {hub_repo}. lorakit does not download anything for a single-file model: "
        f"set model.single_file_config to a local diffusers folder of this family (one with "
        f"{sub}/), e.g. a downloaded copy of {hub_repo}."
    )


def load_scheduler(folder: str, fallback: dict[str, Any], checkpoint: dict[str, torch.Tensor]):
    """The scheduler named in `folder/scheduler` (else `fallback`, a config with `_class_name`).
    A `v_pred` key in the checkpoint (the convention of v-prediction SDXL finetunes) switches the
    prediction type to `v_prediction`."""
    import diffusers

    config = dict(fallback)
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    if "v_pred" in checkpoint:
        config["prediction_type"] = "v_prediction"
    cls = getattr(diffusers, str(config.get("_class_name", "")), None) or diffusers.DDPMScheduler
    return cls.from_config(config)


def load_from_folder(cls: type, folder: str, sub: str, src: str, **kwargs):
    """A component that single files of this family do not carry (or that lorakit does not read
    from them: text encoders of SD3/FLUX), from `folder/sub` of model.single_file_config, local
    files only, fp32, frozen."""
    if not (Path(folder) / sub).is_dir():
        raise LorakitError(
            f"The single-file checkpoint '{src}' needs the {sub} from a diffusers folder of the "
            f"same model, and '{folder}' has no {sub}/. lorakit reads only the transformer (and "
            "the VAE, if the file has one) from SD3/FLUX single files: set "
            "model.single_file_config to a local diffusers folder of this model (with "
            f"{sub}/), e.g. a downloaded copy of its hub repo."
        )
    try:
        if kwargs.pop("tokenizer", False):
            module = cls.from_pretrained(folder, subfolder=sub, local_files_only=True)
            return module
        module = cls.from_pretrained(
            folder, subfolder=sub, local_files_only=True, torch_dtype=torch.float32, **kwargs
        )
    except (OSError, ValueError) as e:
        raise LorakitError(
            f"Could not load the {sub} from model.single_file_config '{folder}' (for the "
            f"checkpoint '{src}'): {_first_line(e)}. Point it at a complete local diffusers "
            "folder of this model."
        ) from None
    module.requires_grad_(False)
    module.eval()
    return module


def has_prefix(checkpoint: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in checkpoint)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__
