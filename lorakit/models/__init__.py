"""Model families (a plain registry) and the function that turns `model.name` into components."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lorakit.config import ModelConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.models.base import AdapterTarget, Family
from lorakit.models.flux import Flux
from lorakit.models.flux2_klein import Flux2Klein
from lorakit.models.qwen_image import QwenImage
from lorakit.models.sd3 import SD3
from lorakit.models.sd15 import SD15
from lorakit.models.sdxl import SDXL
from lorakit.models.z_image import ZImage

FAMILIES: dict[str, Family] = {
    "sd15": SD15(), "sdxl": SDXL(), "sd3": SD3(), "flux": Flux(), "qwen-image": QwenImage(),
    "z-image": ZImage(), "flux2-klein": Flux2Klein(),
}  # fmt: skip

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = ["FAMILIES", "AdapterTarget", "Family", "get_family", "load_model", "resolve_family"]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(
            f"Unknown model family '{name}'. Families: {', '.join(FAMILIES)}. "
            "Set model.family or use tiny:FAMILY."
        )
    return FAMILIES[name]


def _family_from_index(index: dict[str, Any], where: str) -> Family:
    cls = str(index.get("_class_name", ""))
    for fam in FAMILIES.values():
        if cls in fam.pipeline_class_names:
            return fam
    raise LorakitError(
        f"{where} describes a '{cls or 'unknown'}' pipeline, which lorakit does not train. "
        f"Supported pipelines: "
        + ", ".join(c for f in FAMILIES.values() for c in f.pipeline_class_names)
        + ". If it has the same layout as one of them, set model.family explicitly."
    )


def resolve_family(cfg: ModelConfig) -> tuple[Family, str]:
    """Return (family, kind) where kind is `tiny`, `local`, `single_file` or `hub`. Touches the
    network only for hub ids whose family is `auto`."""
    name = cfg.name.strip()
    if not name:
        raise ConfigError(
            "No base model given. Pass --model (tiny:sd15, a hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5, or a local diffusers folder) or "
            "a preset that sets model.name."
        )
    if name.startswith("tiny:"):
        fam = name.split(":", 1)[1]
        if fam not in FAMILIES:
            raise ConfigError(
                f"model.name '{name}': no tiny model for family '{fam}'. Available: "
                + ", ".join(f"tiny:{f}" for f in FAMILIES)
                + "."
            )
        return FAMILIES[fam], "tiny"
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            from lorakit.models import single_file

            found = single_file.detect_family(path)  # also refuses pickles and non-checkpoints
            if cfg.family != "auto":
                return get_family(cfg.family), "single_file"
            if found is None or found not in FAMILIES:
                raise LorakitError(
                    f"model.name '{name}' is a safetensors file whose keys match no family "
                    f"lorakit knows ({', '.join(FAMILIES)}); it may be a LoRA, a VAE or a UNet "
                    "alone. Pass a full model checkpoint, or set model.family if it has the "
                    "layout of one of them."
                )
            return FAMILIES[found], "single_file"
        if cfg.family != "auto":
            return get_family(cfg.family), "local"
        index = path / "model_index.json"
        if not index.is_file():
            raise LorakitError(
                f"'{name}' has no model_index.json, so it is not a diffusers model folder. "
                "Point model.name at the folder that contains model_index.json, or set "
                "model.family if the layout is right but the index is missing."
            )
        return _family_from_index(
            json.loads(index.read_text(encoding="utf-8")), str(index)
        ), "local"
    if _HUB_ID.match(name):
        if cfg.family != "auto":
            return get_family(cfg.family), "hub"
        from huggingface_hub import hf_hub_download

        try:
            index = hf_hub_download(name, "model_index.json", revision=cfg.revision or None)
        except Exception as e:  # network, auth, missing repo: all user-fixable
            raise LorakitError(
                f"Could not read model_index.json of hub model '{name}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Check the id, your network and "
                "`huggingface-cli login` for gated models, or use a local folder."
            ) from None
        return _family_from_index(json.loads(Path(index).read_text(encoding="utf-8")), name), "hub"
    raise ConfigError(
        f"model.name '{name}' is neither an existing folder, a hub id (org/name) nor tiny:FAMILY."
    )


def load_model(cfg: ModelConfig) -> tuple[Family, Any]:
    family, kind = resolve_family(cfg)
    from lorakit.models.quantize import check_quantize

    check_quantize(cfg.quantize, family)  # before any weights are read
    return family, family.load_configured(cfg, kind)
