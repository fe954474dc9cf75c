"""LoRA injection with peft, and the format-neutral `Adapter` that exporters read and write.

`Adapter.modules` maps `(component, module_path)` to `LoraWeights`, where module_path is the
module's diffusers/transformers path in the REAL architecture (checked against the family's fixed
table) and the update the module receives is `ΔW = up @ down * alpha / rank`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from lorakit.config import LoraConfigSection
from lorakit.errors import ConfigError, LorakitError
from lorakit.models.base import AdapterTarget, Family
from lorakit.models.sd15 import UNET_ATTENTION

ADAPTER_NAME = "default"


@dataclass
class LoraWeights:
    down: torch.Tensor
    """`[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d)."""
    up: torch.Tensor
    """`[out, r]` or `[out, r, 1, 1]`."""
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense weight update this LoRA adds (for checks and conversions)."""
        down, up = self.down.float(), self.up.float()
        scale = self.alpha / self.rank
        if down.dim() == 2:
            return up @ down * scale
        # Conv: down [r, in, kh, kw], up [out, r, 1, 1]
        return torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * scale


@dataclass
class Adapter:
    family: str
    modules: dict[tuple[str, str], LoraWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    """Training metadata carried between formats (`ss_*`, `modelspec.*`, `lorakit.*`)."""

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.modules})

    def rank_alpha(self, component: str) -> tuple[int, float, dict[str, int], dict[str, float]]:
        """Most common (rank, alpha) of a component and per-module exceptions (peft patterns)."""
        items = {p: w for (c, p), w in self.modules.items() if c == component}
        rank = Counter(w.rank for w in items.values()).most_common(1)[0][0]
        alpha = Counter(w.alpha for w in items.values()).most_common(1)[0][0]
        rank_pattern = {p: w.rank for p, w in items.items() if w.rank != rank}
        alpha_pattern = {p: w.alpha for p, w in items.items() if w.alpha != alpha}
        return rank, alpha, rank_pattern, alpha_pattern

    def num_parameters(self) -> int:
        return sum(w.down.numel() + w.up.numel() for w in self.modules.values())


def peft_config(cfg: LoraConfigSection, target_modules: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        # empty = UNet attention projections; the training loop passes the family's default
        target_modules=target_modules or list(cfg.target_modules) or list(UNET_ATTENTION),
        init_lora_weights=True if cfg.init == "default" else "gaussian",
    )


def inject_lora(
    module: torch.nn.Module, cfg: LoraConfigSection, seed: int
) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA to `module` (in place); return its parameters.

    Seeded so the initial lora_A is the same for the same seed (lora_B starts at zero).
    """
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(peft_config(cfg), module, adapter_name=ADAPTER_NAME)
    except ValueError as e:
        if "not found" not in str(e) and "Target modules" not in str(e):
            raise
        leaves = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in module.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            }
        )
        raise ConfigError(
            f"Config key 'lora.target_modules' = {cfg.target_modules} matches no layer of the "
            f"{type(module).__name__}. Use module name suffixes such as: {', '.join(leaves[:30])}."
        ) from None
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def text_encoder_targets(family: Family, components) -> list[AdapterTarget]:
    """The family's CLIP text encoders that can carry a LoRA (not the denoiser, not T5)."""
    out = []
    for target in family.targets:
        module = getattr(components, target.component, None)
        if target.component != family.denoiser_name and type(module).__name__.startswith("CLIP"):
            out.append(target)
    return out


def inject_text_encoder_lora(
    family: Family, components, cfg: LoraConfigSection, seed: int
) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA to every CLIP text encoder of `family.targets`; return its params.

    Rank/alpha are `lora.text_encoder_rank`/`text_encoder_alpha` (0 = the denoiser's), target
    modules `lora.text_encoder_target_modules`. Encoder i is seeded with `seed + 1 + i` (the
    denoiser uses `seed`). Every injected module must be in the family's fixed table, so the
    exports can name it."""
    import dataclasses

    targets = text_encoder_targets(family, components)
    if not targets:
        raise ConfigError(
            f"lora.train_text_encoder = true, but the {family.name} model has no CLIP text "
            "encoder lorakit can train. Set lora.train_text_encoder = false."
        )
    te_cfg = dataclasses.replace(
        cfg,
        rank=cfg.text_encoder_rank or cfg.rank,
        alpha=cfg.text_encoder_alpha or cfg.alpha,
        target_modules=list(cfg.text_encoder_target_modules),
    )
    params: list[torch.nn.Parameter] = []
    for i, target in enumerate(targets):
        module = getattr(components, target.component)
        params += inject_lora(module, te_cfg, seed + 1 + i)
        known = family.known_modules(target.component)
        bad = [n for n, _ in lora_layers(module) if canonical_name(target, n) not in known]
        if bad:
            raise ConfigError(
                f"lora.text_encoder_target_modules = {te_cfg.target_modules} put a LoRA on "
                f"{target.component} modules no LoRA format can name ({', '.join(bad[:3])}). "
                "Use q_proj, k_proj, v_proj, out_proj, fc1, fc2."
            )
    return params


def lora_layers(module: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, m in module.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A:
            yield name, m


def extract_adapter(family: Family, components, metadata: dict[str, str] | None = None) -> Adapter:
    """Copy the trained LoRA weights out of the components into an `Adapter` (fp32, CPU)."""
    modules: dict[tuple[str, str], LoraWeights] = {}
    for target in family.targets:
        comp = getattr(components, target.component, None)
        if comp is None:
            continue
        known = family.known_modules(target.component)
        for runtime_name, layer in lora_layers(comp):
            name = canonical_name(target, runtime_name)
            if name not in known:
                raise LorakitError(
                    f"The {target.component} module '{name}' carries a LoRA but is not a module "
                    f"of the real {family.name} architecture, so no inference stack could load "
                    "it. Narrow lora.target_modules."
                )
            modules[(target.component, name)] = LoraWeights(
                down=layer.lora_A[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).clone(),
                up=layer.lora_B[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).clone(),
                alpha=float(layer.lora_alpha[ADAPTER_NAME]),
            )
    if not modules:
        raise LorakitError("The model carries no LoRA weights to export.")
    return Adapter(family.name, modules, dict(metadata or {}))


def canonical_name(target: AdapterTarget, runtime_name: str) -> str:
    """Module path as every LoRA format writes it (adds e.g. the `text_model.` level that
    transformers 5 dropped from CLIPTextModel)."""
    prefix = target.canonical_prefix
    if prefix and not runtime_name.startswith(prefix):
        return prefix + runtime_name
    return runtime_name


def runtime_name(target: AdapterTarget, module: torch.nn.Module, canonical: str) -> str:
    """Inverse of `canonical_name` for the installed library version."""
    prefix = target.canonical_prefix
    if prefix and canonical.startswith(prefix) and not hasattr(module, prefix.rstrip(".")):
        return canonical[len(prefix) :]
    return canonical


def apply_adapter(family: Family, components, adapter: Adapter, scale: float = 1.0) -> None:
    """Inject a saved adapter into components (for sampling / checks), optionally scaled."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    targets = {t.component: t for t in family.targets}
    for component in adapter.components():
        module = getattr(components, component)
        target = targets[component]
        items = {
            runtime_name(target, module, p): w
            for (c, p), w in adapter.modules.items()
            if c == component
        }
        rank, alpha, rank_pattern, alpha_pattern = adapter.rank_alpha(component)
        rank_pattern = {runtime_name(target, module, p): r for p, r in rank_pattern.items()}
        alpha_pattern = {runtime_name(target, module, p): a for p, a in alpha_pattern.items()}
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha * scale,
            target_modules=sorted(items),
            rank_pattern=rank_pattern,
            alpha_pattern={p: a * scale for p, a in alpha_pattern.items()},
        )
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        state = {}
        for path, w in items.items():
            state[f"{path}.lora_A.weight"] = w.down
            state[f"{path}.lora_B.weight"] = w.up
        result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise LorakitError(
                f"{len(unexpected)} adapter weights did not fit the {component}: "
                f"{', '.join(unexpected[:5])}. The adapter was made for another model."
            )
        for _, layer in lora_layers(module):
            for p in layer.parameters():
                p.requires_grad_(False)
