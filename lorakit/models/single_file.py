"""Single-file checkpoints (`model.safetensors` as downloaded from model sites), for any family.

API (what `models/__init__.py` and the family modules call):

- `load_single_file(family, path, config_source="") -> components` — the entry point. Reads the
  file (safetensors only), checks it is a `family` checkpoint, and calls
  `family.from_single_file(checkpoint, folder, source)` with `folder` = `config_source` (a local
  diffusers folder of the same architecture: configs and tokenizers come from there) or, when
  empty, a temp folder holding the family's built-in REAL configs (`family.single_file_configs()`).
  Never touches the network.
- `detect_family(path) -> str | None` — the family of a checkpoint from its key names alone
  (each family's `single_file_markers`; only the header is read).
- Helpers for `family.from_single_file`: `load_converted` (a model whose weights the family's
  naming table converts from the original keys: `ldm_names.*_from_ldm`, the transformer
  families' `names.transformer_from_original`), `load_tokenizer`, `load_scheduler`.

Checkpoints keep the original key layout, described with each family's naming table
(`models/<family>/names.py`): the ldm/SGM layout of the UNet families (`model.diffusion_model.`
UNet, `first_stage_model.` VAE, text encoders), the transformer families' original transformer
layout (usually the transformer alone, plus an optional `first_stage_model.` VAE). Where a file
holds only the transformer (and maybe the VAE), text encoders, tokenizers and scheduler come from
`model.single_file_config` (`load_from_folder`).

float8 files (ComfyUI's `*_fp8_e4m3fn` and `*_fp8_scaled` checkpoints) are dequantized right
when read, for every family (`read_checkpoint(..., dequantize=True)`, `fp8_files`): the family's
`from_single_file` sees the weights in the file's compute dtype, without scales or markers.

ComfyUI's split files (one text encoder or VAE per `.safetensors`, e.g.
`text_encoders/qwen_3_4b.safetensors`, `vae/ae.safetensors`) are found in
`model.single_file_config` by ONE convention for every family (`SplitPart`, `split_file`): the
part's subfolder holding the library's own layout; or that subfolder holding one `.safetensors`
(the split file); or a split file lying at the folder's top level, recognised by its keys (only
headers are read). They are read with `read_split` (fp8 and scaled-fp8 files widened, as above).
`missing_parts` names every part a folder lacks in one paragraph, before the transformer is read.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.models.base import Family

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
    """Family name from the checkpoint's key names (the LAST registered family with a key
    starting with one of its `single_file_markers`, as for `name_hints`: a later family may
    share an earlier one's prefixes — FLUX.2 files have FLUX.1's `double_blocks.` — and adds its
    own), or None if no family matches."""
    from lorakit.models import FAMILIES

    keys = checkpoint_keys(Path(path))
    for family in reversed(list(FAMILIES.values())):
        if any(k.startswith(family.single_file_markers) for k in keys):
            return family.name
    return None


def read_checkpoint(path: str | Path, dequantize: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` checkpoint. `dequantize`: float8 tensors (ComfyUI's plain
    `*_fp8_e4m3fn` and `*_fp8_scaled` files) come back widened to the file's compute dtype, their
    scales and markers removed (`fp8_files.read_dequantized`), so the family's key mapping reads
    them like the bf16 file; `load_single_file` sets it for every family's main file."""
    from safetensors.torch import load_file

    path = Path(path)
    checkpoint_keys(path)  # suffix and readability checks with clear messages
    if dequantize:
        from lorakit.models.fp8_files import read_dequantized

        dequantized = read_dequantized(path)
        if dequantized is not None:
            return dequantized
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


_ALLOW_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_pickle", default=False)
"""`model.allow_pickle` of the load in progress: `load_from_folder` reads the components the
single file lacks from `model.single_file_config` as safetensors only, unless it is set."""


def load_single_file(
    family: Family, path: str | Path, config_source: str = "", allow_pickle: bool = False
) -> Any:
    """Components of `family` from a single-file `.safetensors` checkpoint (see module doc).
    `allow_pickle`: the user's consent (`model.allow_pickle`) to unpickle `.bin` weights of the
    components read from the config folder."""
    token = _ALLOW_PICKLE.set(allow_pickle)
    try:
        return _load_single_file(family, path, config_source)
    finally:
        _ALLOW_PICKLE.reset(token)


def _load_single_file(family: Family, path: str | Path, config_source: str) -> Any:
    path = Path(path).expanduser()
    found = detect_family(path)
    if found is not None and found != family.name:
        raise ConfigError(
            f"model.name '{path}' is a {found} checkpoint, but model.family is '{family.name}'. "
            f"Set model.family = '{found}' (or 'auto')."
        )
    from lorakit.models import fp8_files

    checkpoint = read_checkpoint(path, dequantize=True)  # checks the file first
    float8 = bool(fp8_files.float8_keys(fp8_files.read_header(path)[0]))
    with config_folder(family, config_source) as folder:
        comps = family.from_single_file(checkpoint, folder, str(path))
    if float8:  # for quantize_loaded: no second (bitsandbytes) quantization of fp8 weights
        fp8_files.mark_float8_source(getattr(comps, family.denoiser_name, None), path)
    return comps


# -- helpers for Family.from_single_file -----------------------------------------------------------


def load_converted(
    cls: type, checkpoint: dict[str, torch.Tensor], folder: str, sub: str, src: str, convert
):
    """One model of the checkpoint: `cls` with the config of `folder/sub`, built empty (meta
    device, buffers real), its weights `convert(model, checkpoint)` (a state dict made by the
    family's naming table, which raises on a missing or unknown key), frozen, eval; fp32, or
    inside `loading.load_in` the run's dtype for that part (`loading.target_dtype`)."""
    from accelerate import init_empty_weights

    try:
        if hasattr(cls, "load_config"):  # diffusers models
            config = cls.load_config(folder, subfolder=sub, local_files_only=True)
            with init_empty_weights():
                model = cls.from_config(config)
        else:  # transformers text encoders
            config = cls.config_class.from_pretrained(folder, subfolder=sub, local_files_only=True)
            with init_empty_weights():
                model = cls(config)
        dtype = _target(cls, sub)
        state = {
            k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
            for k, v in convert(model, checkpoint).items()
        }
        model.load_state_dict(own_storage(state), strict=True, assign=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LorakitError(
            f"Could not read the {sub} from the checkpoint '{src}': {_first_line(e)}. The file "
            f"and the configs in {folder} must describe the same architecture; if the model is "
            "not a standard one, pass its diffusers folder as model.single_file_config."
        ) from None
    model.requires_grad_(False)
    model.eval()
    return model


def own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every tensor on a storage of its own, for `load_state_dict(assign=True)`:
    the parts of a split fused weight (FLUX's qkv) share the fused tensor's storage, and a model
    holding such views could not be saved; only those are copied."""
    shared = Counter(v.untyped_storage().data_ptr() for v in state.values())
    return {
        k: v.clone() if shared[v.untyped_storage().data_ptr()] > 1 else v for k, v in state.items()
    }


def _target(cls: type, sub: str) -> torch.dtype:
    from lorakit.models.loading import target_dtype

    if sub.startswith("vae"):
        part = "vae"
    elif sub.startswith("text_encoder"):
        part = "t5" if cls.__name__.startswith("T5") else "text_encoder"
    else:
        part = "denoiser"
    return target_dtype(part) or torch.float32


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
    A `v_pred` key in the checkpoint (the convention of v-prediction finetunes) switches the
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
    from them: the text encoders of the transformer families), from `folder/sub` of
    model.single_file_config, local files only, fp32, frozen."""
    if not (Path(folder) / sub).is_dir():
        raise LorakitError(
            f"The single-file checkpoint '{src}' needs the {sub} from a diffusers folder of the "
            f"same model, and '{folder}' has no {sub}/. lorakit reads only the transformer (and "
            "the VAE, if the file has one) from this family's single files: set "
            "model.single_file_config to a local diffusers folder of this model (with "
            f"{sub}/), e.g. a downloaded copy of its hub repo."
        )
    try:
        if kwargs.pop("tokenizer", False):
            module = cls.from_pretrained(folder, subfolder=sub, local_files_only=True)
            return module
        module = cls.from_pretrained(
            folder,
            subfolder=sub,
            local_files_only=True,
            torch_dtype=torch.float32,
            # safetensors only without consent; with it, safetensors first, else the pickle
            use_safetensors=None if _ALLOW_PICKLE.get() else True,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        if not _ALLOW_PICKLE.get() and not any((Path(folder) / sub).glob("*.safetensors")):
            raise LorakitError(
                f"The {sub} in model.single_file_config '{folder}' (for the checkpoint '{src}') "
                "has no .safetensors weights, only pickled ones, and lorakit does not unpickle "
                "files without your consent (a pickle can run code). Convert them to "
                "safetensors, or allow it with --allow-pickle if you trust "
                "their source."
            ) from None
        raise LorakitError(
            f"Could not load the {sub} from model.single_file_config '{folder}' (for the "
            f"checkpoint '{src}'): {_first_line(e)}. Point it at a complete local diffusers "
            "folder of this model."
        ) from None
    module.requires_grad_(False)
    module.eval()
    return module


@dataclass(frozen=True)
class SplitPart:
    """A component `from_single_file` takes from `model.single_file_config` (see module doc)."""

    sub: str
    """Its subfolder (`text_encoder`, `vae`, `tokenizer`)."""
    hint: str
    """What to put there, for messages ("ComfyUI's text_encoders/qwen_3_4b.safetensors, or …")."""
    library_names: tuple[str, ...] = ()
    """Weight files of the library's own layout in `sub/`: where one exists, `sub/` is loaded by
    `load_from_folder`, not as a split file. Empty for the tokenizer (never a split file)."""
    markers: tuple[str, ...] = ()
    """Keys a split file of this part has, all of them: how one is recognised at the top level."""
    excluded: tuple[str, ...] = ()
    """Keys it never has (a FLUX.2 VAE's `bn.running_mean` in a FLUX.1-style VAE's part)."""


def _header_keys(path: Path) -> set[str] | None:
    from lorakit.models.fp8_files import read_header

    try:
        return set(read_header(path)[0])
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None  # not a safetensors file: not a split file of ours either


def split_file(folder: str, part: SplitPart) -> Path | None:
    """The split file of `part` in `folder` (see module doc), or None: `folder/sub/`'s only
    `.safetensors` when `sub/` does not hold the library layout, else the first top-level
    `.safetensors` (by name) whose header has every marker and no excluded key."""
    if not part.library_names:
        return None
    where = Path(folder) / part.sub
    if where.is_dir() and not any((where / n).exists() for n in part.library_names):
        files = sorted(where.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
    if not part.markers:
        return None
    for path in sorted(Path(folder).glob("*.safetensors")):
        keys = _header_keys(path)
        if keys is None or any(x in keys for x in part.excluded):
            continue
        if all(m in keys for m in part.markers):
            return path
    return None


def part_present(folder: str, part: SplitPart) -> bool:
    """Whether `folder` has `part`: tokenizer files, weights in `sub/`, or a split file."""
    where = Path(folder) / part.sub
    if not part.library_names:
        return (where / "tokenizer.json").is_file() or (where / "vocab.json").is_file()
    if where.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in where.iterdir()):
        return True
    return split_file(folder, part) is not None


def missing_parts(
    label: str, source: str, folder: str, parts: list[SplitPart], repo: str
) -> LorakitError | None:
    """One paragraph naming every part of `parts` that `folder` lacks, or None. `label`: the
    model ("Qwen-Image"); `repo`: the hub repo whose download has every part."""
    missing = [p for p in parts if not part_present(folder, p)]
    if not missing:
        return None
    # config_folder's temp folder of built-in configs: the user gave no folder
    name = Path(folder).name
    given = not (name.startswith("lorakit-") and "-config-" in name)
    where = f"'{folder}' has no" if given else "model.single_file_config is not set, so there is no"
    needs = "; ".join(f"{p.sub}/ with {p.hint}" for p in missing)
    files = (
        " (a split .safetensors may also lie in the folder itself)"
        if any(p.markers for p in missing)
        else ""
    )
    return LorakitError(
        f"The {label} checkpoint '{source}' holds the diffusion model only, and {where} "
        f"{', '.join(p.sub + '/' for p in missing)} to take the rest from. Set "
        f"model.single_file_config to a folder with {needs}{files}. A downloaded copy of the "
        f"{repo} hub repo has them all and works as model.single_file_config too; lorakit "
        "downloads nothing for a single-file model."
    )


@contextlib.contextmanager
def config_dir(folder: str, sub: str, builtin: dict[str, Any]) -> Iterator[str]:
    """`folder` when `folder/sub/config.json` exists, else a temp folder holding `builtin` as
    `sub/config.json` (a split file's component with the real model's config)."""
    if (Path(folder) / sub / "config.json").is_file():
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="lorakit-part-") as tmp:
        (Path(tmp) / sub).mkdir()
        (Path(tmp) / sub / "config.json").write_text(json.dumps(builtin), encoding="utf-8")
        yield tmp


def read_split(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a split file, float8 and scaled-fp8 ones widened (`read_checkpoint`)."""
    return read_checkpoint(path, dequantize=True)


def has_prefix(checkpoint: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in checkpoint)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__
