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
from lorakit.models.base import ATTENTION_PROJECTIONS, AdapterTarget, Family

ADAPTER_NAME = "default"


@dataclass
class LoraWeights:
    down: torch.Tensor
    """`[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d)."""
    up: torch.Tensor
    """`[out, r]` or `[out, r, 1, 1]`."""
    alpha: float
    magnitude: torch.Tensor | None = None
    """DoRA: peft's `lora_magnitude_vector` `[out]`, the norm each output row of W + ΔW is
    rescaled to (W' = magnitude · (W + ΔW) / ‖W + ΔW‖_row); None = plain LoRA."""

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
class LycorisWeights:
    """A LoHa or LoKr module, tensors under their LyCORIS/peft names (no module prefix).

    loha: `hada_w1_a [out, r]`, `hada_w1_b [r, in·kh·kw]`, `hada_w2_a`, `hada_w2_b` (same shapes);
          ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank.
    lokr: `lokr_w1 [a, c]` (or `lokr_w1_a/_b`), `lokr_w2 [b, d]` (or `lokr_w2_a [b, r]`,
          `lokr_w2_b [r, d]`); ΔW = kron(w1, w2) · alpha / rank, shape `[a·b, c·d]`.
    `rank` is the divisor of alpha (peft's r); when both LoKr factors are full matrices the
    scale is baked into `lokr_w2` and alpha = rank, because ComfyUI/LyCORIS then ignore alpha.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float
    rank: int

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "loha":
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:  # a conv's full w2 [c, d, kh, kw]: peft's make_kron widens w1
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2)
        d = d * (self.alpha / self.rank)
        return d.reshape(shape) if shape else d


AdapterWeights = LoraWeights | LycorisWeights


@dataclass
class Adapter:
    family: str
    modules: dict[tuple[str, str], AdapterWeights]
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
        return sum(_numel(w) for w in self.modules.values())

    def kind(self) -> str:
        """`lora`, `dora`, `loha` or `lokr` (one kind per adapter)."""
        kinds = {_kind(w) for w in self.modules.values()}
        if len(kinds) > 1:
            raise LorakitError(f"The adapter mixes adapter kinds ({', '.join(sorted(kinds))}).")
        return kinds.pop()


def _kind(w: AdapterWeights) -> str:
    if isinstance(w, LycorisWeights):
        return w.kind
    return "lora" if w.magnitude is None else "dora"


def _numel(w: AdapterWeights) -> int:
    if isinstance(w, LycorisWeights):
        return sum(t.numel() for t in w.tensors.values())
    return w.down.numel() + w.up.numel() + (0 if w.magnitude is None else w.magnitude.numel())


def peft_config(cfg: LoraConfigSection, target_modules: list[str] | None = None):
    """peft config of `lora.type` (LoraConfig / LoHaConfig / LoKrConfig) with rsLoRA, DoRA and
    the per-module rank/alpha patterns (regex or suffix of the module's runtime name)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    # empty = diffusers' attention projections; the training loop passes the family's default
    targets = target_modules or list(cfg.target_modules) or list(ATTENTION_PROJECTIONS)
    kind = getattr(cfg, "type", "lora")
    common = dict(
        r=cfg.rank,
        target_modules=targets,
        rank_pattern=dict(getattr(cfg, "rank_pattern", {}) or {}),
        alpha_pattern=dict(getattr(cfg, "alpha_pattern", {}) or {}),
    )
    if kind == "loha":
        return LoHaConfig(alpha=cfg.alpha, module_dropout=cfg.dropout, **common)
    if kind == "lokr":
        return LoKrConfig(alpha=cfg.alpha, module_dropout=cfg.dropout, **common)
    return LoraConfig(
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=True if cfg.init == "default" else "gaussian",
        use_rslora=bool(getattr(cfg, "use_rslora", False)),
        use_dora=bool(getattr(cfg, "use_dora", False)),
        **common,
    )


ADAPTER_PREFIXES = ("lora_", "hada_", "lokr_")
"""Parameter-name prefixes of peft's LoRA (incl. DoRA's lora_magnitude_vector), LoHa, LoKr."""


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
    params = [p for n, p in module.named_parameters() if any(x in n for x in ADAPTER_PREFIXES)]
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

    `cfg` is the LoRA section as the text encoders get it (`RunSpec.text_encoder_lora`, from
    `spec.text_encoder_section`: rank, alpha and target modules already the text encoders').
    Encoder i is seeded with `seed + 1 + i` (the denoiser uses `seed`). Every injected module
    must be in the family's fixed table, so the exports can name it."""
    targets = text_encoder_targets(family, components)
    if not targets:
        raise ConfigError(
            f"lora.train_text_encoder = true, but the {family.name} model has no CLIP text "
            "encoder lorakit can train: its text encoders are large T5/LLM models whose LoRA "
            "neither the family's diffusers pipeline nor the community's LoRA files carry, so "
            "lorakit trains the denoiser only. Set lora.train_text_encoder = false."
        )
    params: list[torch.nn.Parameter] = []
    for i, target in enumerate(targets):
        module = getattr(components, target.component)
        params += inject_lora(module, cfg, seed + 1 + i)
        known = family.known_modules(target.component)
        bad = [n for n, _ in lora_layers(module) if canonical_name(target, n) not in known]
        if bad:
            raise ConfigError(
                f"lora.text_encoder_target_modules = {cfg.target_modules} put a LoRA on "
                f"{target.component} modules no LoRA format can name ({', '.join(bad[:3])}). "
                "Use q_proj, k_proj, v_proj, out_proj, fc1, fc2."
            )
    return params


def lora_layers(module: torch.nn.Module):
    """(runtime name, peft layer) of every LoRA/DoRA/LoHa/LoKr layer carrying our adapter."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    for name, m in module.named_modules():
        if isinstance(m, (LoraLayer, LycorisLayer)) and ADAPTER_NAME in getattr(m, "scaling", {}):
            yield name, m


def _cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):
        # FSDP2 shards every parameter as a DTensor: gather the whole tensor. A collective, so
        # under FSDP every rank must extract (in the same module order), not only rank 0.
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32).clone()


def layer_weights(layer) -> AdapterWeights:
    """The adapter of one peft layer as format-neutral weights.

    The stored alpha is `scaling · rank`, so every stack's `alpha / rank` reproduces peft's
    scale exactly: for rsLoRA (scale alpha/√r) that is alpha' = alpha·√r."""
    from peft.tuners.lora import LoraLayer

    scaling = float(layer.scaling[ADAPTER_NAME])
    if isinstance(layer, LoraLayer):
        down = _cpu(layer.lora_A[ADAPTER_NAME].weight)
        magnitude = None
        if layer.use_dora.get(ADAPTER_NAME):
            magnitude = _cpu(layer.lora_magnitude_vector[ADAPTER_NAME].weight)
        return LoraWeights(
            down=down,
            up=_cpu(layer.lora_B[ADAPTER_NAME].weight),
            # plain LoRA keeps its alpha bit-exact; rsLoRA stores alpha' = scale · r
            alpha=scaling * down.shape[0]
            if layer.use_rslora.get(ADAPTER_NAME)
            else float(layer.lora_alpha[ADAPTER_NAME]),
            magnitude=magnitude,
        )
    rank = int(layer.r[ADAPTER_NAME])
    kind = "loha" if type(layer).__module__.startswith("peft.tuners.loha") else "lokr"
    tensors = {
        name: _cpu(getattr(layer, name)[ADAPTER_NAME])
        for name in layer.adapter_layer_names
        if ADAPTER_NAME in getattr(layer, name)
    }
    if set(tensors) & {"hada_t1", "hada_t2", "lokr_t2"}:
        raise LorakitError("Tucker-decomposed (effective conv2d) LoHa/LoKr cannot be exported.")
    if kind == "lokr" and {"lokr_w1", "lokr_w2"} <= set(tensors):
        # both factors full: ComfyUI/LyCORIS apply scale 1 whatever the alpha — bake it in
        tensors["lokr_w2"] = tensors["lokr_w2"] * scaling
        return LycorisWeights(kind, tensors, float(rank), rank)
    return LycorisWeights(kind, tensors, scaling * rank, rank)


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
            modules[(target.component, name)] = layer_weights(layer)
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
    """Inject a saved adapter into components (for sampling / checks), optionally scaled.

    Every kind: LoRA (rsLoRA files carry the adjusted alpha), DoRA (magnitudes copied in),
    LoHa and LoKr (peft layers of the same structure, tensors copied in). `scale` multiplies
    alpha (for DoRA that scales the direction update, as peft does)."""
    from peft import (
        LoHaConfig,
        LoKrConfig,
        LoraConfig,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )

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
        kinds = {_kind(w) for w in items.values()}
        if len(kinds) > 1:
            raise LorakitError(
                f"The {component} adapter mixes kinds ({', '.join(sorted(kinds))}); "
                "lorakit applies one kind per component."
            )
        kind = kinds.pop()
        common = dict(
            r=rank,
            target_modules=sorted(items),
            # peft reads pattern keys as regexes matched against a name suffix: escape paths
            rank_pattern={_re_escape(p): r for p, r in rank_pattern.items()},
            alpha_pattern={_re_escape(p): a * scale for p, a in alpha_pattern.items()},
        )
        if kind in ("loha", "lokr"):
            # explicit (r, alpha) per module: r also decides peft's LoKr factor structure
            per = {_re_escape(p): _peft_rank_alpha(w) for p, w in items.items()}
            common["r"], first_alpha = next(iter(per.values()))
            common["rank_pattern"] = {p: r for p, (r, _) in per.items()}
            common["alpha_pattern"] = {p: a * scale for p, (_, a) in per.items()}
            cls = LoHaConfig if kind == "loha" else LoKrConfig
            inject_adapter_in_model(
                cls(alpha=first_alpha * scale, **common), module, adapter_name=ADAPTER_NAME
            )
            _copy_lycoris(module, items, component)
            continue
        config = LoraConfig(lora_alpha=alpha * scale, use_dora=kind == "dora", **common)
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
        if kind == "dora":
            layers = dict(lora_layers(module))
            with torch.no_grad():
                for path, w in items.items():
                    target_vec = layers[path].lora_magnitude_vector[ADAPTER_NAME].weight
                    target_vec.copy_(w.magnitude.reshape(target_vec.shape))
        _freeze(module)


def _peft_rank_alpha(w: LycorisWeights) -> tuple[int, float]:
    """(r, alpha) that make peft build this module's factor structure at this scale: a full
    `lokr_w2 [b, d]` needs r ≥ max(b, d) / 2 in peft, so r = max(b, d) there."""
    if w.kind == "lokr" and "lokr_w2" in w.tensors:
        r = max(w.tensors["lokr_w2"].shape)
        return r, w.alpha / w.rank * r
    return w.rank, w.alpha


def _re_escape(path: str) -> str:
    import re

    return re.escape(path)


def _freeze(module: torch.nn.Module) -> None:
    for _, layer in lora_layers(module):
        for p in layer.parameters():
            p.requires_grad_(False)


def _copy_lycoris(module: torch.nn.Module, items: dict, component: str) -> None:
    """Copy LoHa/LoKr tensors into freshly injected peft layers of the same structure."""
    layers = dict(lora_layers(module))
    with torch.no_grad():
        for path, w in items.items():
            layer = layers[path]
            have = {n for n in layer.adapter_layer_names if ADAPTER_NAME in getattr(layer, n)}
            if have != set(w.tensors):
                raise LorakitError(
                    f"The {w.kind} module '{component}.{path}' stores {sorted(w.tensors)}, but "
                    f"peft builds {sorted(have)} for this layer (another factorisation); "
                    "lorakit cannot apply it."
                )
            for name, t in w.tensors.items():
                dest = getattr(layer, name)[ADAPTER_NAME]
                if dest.shape != t.shape:
                    raise LorakitError(
                        f"'{component}.{path}.{name}' has shape {tuple(t.shape)}, the model "
                        f"needs {tuple(dest.shape)}. The adapter was made for another model."
                    )
                dest.copy_(t)
    _freeze(module)
