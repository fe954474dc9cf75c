"""The contract between the training loop and a model family.

A family module (`models/sd15/`, …) implements `Family`. The training loop, sampling and
exporters only talk to this protocol, so adding a family never adds branches to them.

Conventions every family documents in its own docstring:
- pixel tensors are `[B, 3, H, W]` float in [-1, 1];
- latents are what the denoiser sees, already multiplied by the VAE scaling factor;
- `cond` is a dict of named conditioning tensors whose first dimension is the batch, so it can be
  cached per caption, stacked and indexed without knowing what is inside.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from lorakit.config import ModelConfig, TrainConfig

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""diffusers `Attention` projections: the UNet families' default LoRA targets, and the targets
`lora.peft_config` falls back to when neither the config nor the caller names any."""


@dataclass(frozen=True)
class PlanArch:
    """Shapes of a family's REAL model that `lorakit plan` feeds its denoiser (no weights)."""

    latent_channels: int
    """VAE latent channels C of the latents `[B, C, H/8, W/8]` (4 for the SD VAE, 16 for
    SD3/FLUX's)."""
    text_tokens: int
    """Fixed-length CLIP tokens of `encoder_hidden_states` (77), to which the family adds its T5
    sequence where it has one (`planner_inputs`); 0 where the sequence is T5 only."""
    text_dim: int
    """Feature width D of `encoder_hidden_states` `[B, tokens, D]`."""
    pooled_dim: int
    """Width of the pooled text vector (`text_embeds` / `pooled_projections`); 0 = none."""
    cfg_batch: int
    """Denoiser batch per preview image (2 with classifier-free guidance; FLUX-dev: 1)."""


@dataclass(frozen=True)
class AdapterTarget:
    """Where a component's LoRA lives in the exported files."""

    component: str
    """Attribute name on the components object / diffusers prefix (`unet`, `text_encoder`)."""
    kohya_prefix: str
    """Key prefix in kohya-format files (`lora_unet_`, `lora_te_`)."""
    canonical_prefix: str = ""
    """Prefix every LoRA format puts before module paths of this component but some library
    versions do not have (transformers 5 dropped CLIPTextModel's `text_model.` level)."""
    label: str = ""
    """What the component is, for messages (`T5-XXL`); empty = the component name says it."""
    trained: bool = True
    """False for components lorakit never puts a LoRA on itself (FLUX's T5): their modules in
    third-party files are still read, applied when the component is loaded, and re-exported."""


class Family(Protocol):
    name: str
    """Registry key, e.g. `sd15`."""
    pipeline_class_names: tuple[str, ...]
    """`_class_name` values in `model_index.json` that belong to this family."""
    base_model_version: str
    """kohya `ss_base_model_version` (A1111 filters LoRAs by it)."""
    modelspec_architecture: str
    """`modelspec.architecture` of a LoRA for this family, ending in `/lora`."""
    denoiser_name: str
    """Attribute holding the module that gets the LoRA (`unet` or `transformer`)."""
    kohya_names: str
    """What kohya's `original` naming means for this family (`diffusers`, `sgm`, `bfl`, `sd3`),
    recorded in every kohya file as `lorakit.kohya_names`."""
    kohya_split_prefix: str
    """Denoiser key prefix of kohya files with diffusers names where it is not the original
    naming's (transformer families: `lora_transformer_`); empty otherwise."""
    diffusers_strength: str
    """How diffusers-format files carry alpha: `header` (diffusers' JSON only) or `folded`
    (alpha/rank multiplied into lora_B, alpha = rank, so ComfyUI/Forge load them too)."""
    loaders: dict
    """(format[, kohya naming]) → who loads that file at the trained strength, where it differs
    from the format's default; tests/test_export_matrix.py checks every entry."""
    targets: tuple[AdapterTarget, ...]
    """Components that can carry an adapter, in export order."""
    tiny_resolution: int
    """A resolution that suits the tiny model (tests, demo)."""
    pixel_multiple: int
    """Image sides must be multiples of this many pixels: the VAE factor (8), times the patch
    size where a transformer packs latent patches (SD3/FLUX: 16)."""
    text_length: int
    """Default token length of the long text encoder (`model.t5_max_length` = 0 takes it);
    0 for families whose prompts are fixed 77-token CLIP sequences."""
    default_targets: tuple[str, ...]
    """LoRA target-module suffixes used when `lora.target_modules` is empty (attention
    projections; SD3/FLUX: both streams')."""
    default_export_format: str
    """`lorakit export` default format: the one ComfyUI and A1111 load for this family
    (`kohya`, `diffusers`)."""
    quantizable: bool
    """Whether `model.quantize` (bitsandbytes NF4/int8 of the denoiser's Linear layers) applies:
    the denoiser is loaded through `quantize.quantized_kwargs` / `quantize_loaded`."""
    swap_blocks: tuple[str, ...]
    """Attribute names of the denoiser's `nn.ModuleList`s of repeated transformer blocks, in the
    order the forward pass runs them (FLUX: `transformer_blocks`, then
    `single_transformer_blocks`). `train.block_swap = N` streams the frozen weights of the LAST N
    blocks over these lists, concatenated, from host memory (`lorakit/blockswap.py`); each block
    must be called as a module (its forward hooks run) once per forward pass. `()`: block swap
    is not supported (the UNet families, whose blocks differ in shape and nest)."""
    min_resolution: int
    """Smallest `data.resolution` (pixels) `lorakit plan` proposes to make a run fit: below it
    the real model's results degrade (SD1.5 256; models trained at 1024² px 512)."""
    name_hints: tuple[str, ...]
    """Lower-case substrings of a `model.name` that mark this family offline (`lorakit plan` on a
    hub id with `model.family = auto`). Families are tried in reverse registry order (the later
    registered, usually the more specific, first), each family's hints in order."""
    plan_arch: PlanArch
    """Shapes of the REAL model the planner feeds the denoiser (see `planner_inputs`)."""

    single_file_markers: tuple[str, ...]
    """Key prefixes whose presence identifies this family's single-file checkpoint
    (`single_file.detect_family`): keys no other family's checkpoint has (SDXL's OpenCLIP
    `conditioner.embedders.1.model.`, not the UNet keys SD1.5 shares)."""

    # Names: each family's ONE diffusers ↔ original naming table lives in
    # `models/<family>/names.py` (shared pieces: `models/naming.py`, `models/ldm_names.py`); the
    # members below are its directions. Exporters, importers, single-file loading and
    # `merge --single-file` call them and name no family.

    def kohya_original_table(self) -> dict | None:
        """Kohya key names ↔ diffusers modules for the `original` naming (fused projections
        included), `(component, original dotted path) → naming.Entry`; None = diffusers names
        (identity)."""

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        """Every weight of `components` under its ORIGINAL checkpoint key (contiguous detached
        copies), as one single-file checkpoint (`lorakit merge --single-file`); the inverse of
        `from_single_file`. Raises LorakitError where the family has no single-file layout."""

    def variant_metadata(self, components: Any) -> dict[str, str]:
        """`ss_base_model_version` / `modelspec.architecture` of the loaded variant where they
        differ from the class-level `base_model_version` / `modelspec_architecture` (SD3 medium
        / SD3.5 medium / large, FLUX.1 dev / schnell); {} for a single-variant family."""

    def named_by(self, architecture: str, version: str) -> bool:
        """Whether a LoRA file's `modelspec.architecture` / kohya `ss_base_model_version` name
        this family (used to pick a family when keys alone do not decide)."""

    def build_tiny(self, seed: int = 0) -> Any:
        """Random-weight components with the family's real structure, offline, in seconds."""

    def load(self, name: str, *, revision: str, variant: str, allow_pickle: bool) -> Any:
        """Components from a local diffusers folder or a hub id through `from_pretrained`."""

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        """The REAL model's diffusers configs by subfolder (`unet`, `vae`, `text_encoder`, …,
        `scheduler`), written to a temp folder to load a single-file checkpoint offline when the
        user gives no `model.single_file_config` folder."""

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> Any:
        """Components from an original-layout checkpoint (ldm/SGM key names) already read into
        `checkpoint`, with configs (and tokenizers, if present) from the diffusers-layout
        `folder`. `source` names the file in error messages. Use the helpers in
        `models/single_file.py`; callers go through `single_file.load_single_file`."""

    def load_configured(self, cfg: ModelConfig, kind: str) -> Any:
        """Components for `model.*` options `cfg`: built (`kind == "tiny"`), read from a
        single-file checkpoint (`single_file`) or loaded (`local` / `hub`), with the options
        applied that the family supports (T5 length, drop_t5, quantize). `load_model` calls it
        after `resolve_family` and `quantize.check_quantize`."""

    real_label: str
    """The real model `build_real_*` / `plan_arch` describe, as `lorakit plan` names it
    ("SD3.5 large", "FLUX.2 klein 9B")."""

    def real_model(self, model_name: str) -> Family:
        """The family object whose real architecture (`plan_arch`, `build_real_*`,
        `real_label`) is the model `model_name` names, for `lorakit plan`: a family with
        published sizes of different widths (FLUX.2 klein 4B / 9B) returns the one the name
        says; `self` otherwise (its largest published variant)."""

    def build_real_denoiser(self) -> torch.nn.Module:
        """The REAL denoiser (the largest published variant the planner plans for: SD1.5, SDXL
        base, SD3.5 large, FLUX.1-dev; or the one `real_model` picked) built from its config
        with random weights. Call it under `accelerate.init_empty_weights(include_buffers=True)`
        for a meta-device model."""

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        """The REAL VAE and text encoders, named as `frozen_modules` names them (random weights;
        call under `init_empty_weights`). `drop_t5` leaves the T5 encoder out where the family
        can train without it (`model.drop_t5`); other families ignore it."""

    def planner_inputs(
        self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Meta-device inputs of one `predict` call of the REAL denoiser: latents
        `[batch, plan_arch.latent_channels, h, w]` (h, w in latent pixels, `dtype`), timesteps
        `[batch]` (the family's kind: integer steps or sigmas) and the `cond` dict `predict`
        reads (`encoder_hidden_states` `[batch, tokens, plan_arch.text_dim]`, tokens =
        `plan_arch.text_tokens` + `text_len` T5 tokens where the family has T5, plus the
        family's pooled / micro-conditioning entries)."""

    def save(self, components: Any, folder: str) -> None:
        """Save components as a diffusers folder that `load` (and diffusers) read back."""

    def known_modules(self, component: str) -> frozenset[str]:
        """Fixed table: every module name of the REAL architecture that can carry a LoRA."""

    def encode_images(self, components: Any, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in [-1, 1] → scaled latents."""

    def encode_prompts(self, components: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Captions → conditioning dict (batch-first tensors)."""

    def encode_prompts_train(self, components: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`encode_prompts` WITH autograd (no `torch.no_grad`), for training text-encoder LoRA:
        same dict, same shapes, gradients flow into the text encoders' LoRA weights. Not
        cacheable: call it per batch."""

    def image_conditioning(
        self,
        components: Any,
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int],
        target_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Per-image conditioning (batch dim 1), merged into `cond` next to the caption's.
        Sizes are (height, width) in pixels. Empty for families without micro-conditioning."""

    def noise_and_timesteps(
        self,
        components: Any,
        latents: torch.Tensor,
        generator: torch.Generator,
        train: TrainConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the training noise and timesteps for a batch of latents (on CPU, seeded).
        What "timesteps" holds (integer steps or flow sigmas) is the family's documented choice."""

    def loss(
        self,
        components: Any,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        cond: dict[str, torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        train: TrainConfig,
    ) -> torch.Tensor:
        """Scalar fp32 training loss for one batch (noise offset, loss weighting from `train`).
        It computes its prediction with exactly one call `self.predict(denoiser, noisy,
        timesteps, cond)`: anti-bleed preservation and the bleed score (`lorakit/preserve.py`)
        read the denoiser's inputs through that call (`tests/test_preserve.py` checks it)."""

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The denoiser's raw output for given inputs (used by loss and by tests)."""

    def pipeline(self, components: Any, scheduler: str = "default") -> Any:
        """A diffusers pipeline sharing these components, for preview sampling."""

    def frozen_modules(self, components: Any) -> dict[str, torch.nn.Module]:
        """Frozen modules by name (moved/cast by the loop; never trained)."""


# --- training–inference agreement (tests/test_agreement.py) -------------------------------------


@dataclass(frozen=True)
class AgreementSetting:
    """One run of the training–inference agreement test: lorakit trains a LoRA on ONE image
    (`res` px, its caption), the family's diffusers pipeline samples the caption from noise with
    each of `seeds`; the samples must point the way of the image's latent."""

    steps: int
    """Optimizer steps (AdamW, cosine decay to 0)."""
    threshold: float
    """Minimum mean cosine of the sampled latents with the image's latent."""
    layout_threshold: float
    """Minimum mean cosine of their layouts (per-channel means removed)."""
    lr: float = 1e-2
    batch: int = 8
    """Noise draws of the one image per step."""
    seeds: tuple[int, ...] = (0, 1)
    """Sampling seeds (one pipeline call each)."""
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    res: int = 64


class AgreementSupport(Protocol):
    """What the training–inference agreement test needs from a family and cannot find out by
    itself: which tiny model can memorise an image, how long to train it, and how the
    pipeline's `output_type="latent"` result maps to lorakit's latents. Everything else (the
    pipeline call, where the noisy latent sits in the denoiser's inputs, the output the
    pipeline's scheduler step expects, the schedule's shift) the test reads off the pipeline
    and off the family's own `loss` by probing them.

    A family provides it as `AGREEMENT` in `models/<family>/agreement.py` (next to the module
    that defines the family class; `agreement_support` finds it). A registered family without
    one fails the test."""

    targets: tuple[str, ...]
    """LoRA target modules: every Linear/Conv the family's tables export (an attention-only LoRA
    memorises far slower than one that includes the embedders and modulations)."""
    text_length: int
    """Caption tokens the components encode with (`model.t5_max_length` / the pipeline's
    `max_sequence_length`, passed to the pipeline where its `__call__` takes it); 0 where the
    prompts are fixed-length CLIP sequences."""
    default: AgreementSetting
    """The default-tier run (seconds on 2 CPU cores)."""
    default_tier: bool
    """False: the `default` run goes to the slow tier too (a family whose denoiser, target and
    schedule another family's default run already covers), to keep the default run short."""
    slow: AgreementSetting
    """The slow-tier run, with the stricter thresholds."""
    faults: Mapping[str, Callable[[], AbstractContextManager[Any]]]
    """Deliberate bugs in this family's own training conventions (name → a context manager
    that puts the bug in lorakit's training side), each of which the default run must catch;
    the test adds the generic ones (timestep scale, output sign, and for flow families the
    noising shift and the timestep sampler's shift)."""

    def components(self, pixels: torch.Tensor, seed: int = 0) -> Any:
        """Tiny components (`build_tiny`'s structure, widened where it is too narrow to memorise
        an image; text length `text_length`) whose VAE normalisation — the family's own
        convention: scaling/shift factors, per-channel mean/std or batch-norm statistics — is
        set so that `encode_images(pixels)` (`[1, 3, res, res]` in [-1, 1]) has RMS ≈ 1, the
        scale the noise schedules assume (a random VAE's latents are far from it). The same
        `pixels` and `seed` give identical components."""

    def latents_from_pipeline(
        self, pipe: Any, latents: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """What `pipe(..., output_type="latent")` returns for a `height` × `width` px image →
        lorakit's latents `[B, C, h, w]` as `encode_images` makes them (unpacked and normalised
        with the pipeline's own code where it has it)."""


def agreement_support(family: Family) -> AgreementSupport | None:
    """The family's `AgreementSupport` (`AGREEMENT` in the `agreement` module of the package
    that defines its class: `models/<family>/agreement.py`), or None where it has none."""
    defining = importlib.import_module(type(family).__module__)
    package = defining.__name__ if hasattr(defining, "__path__") else defining.__package__
    if not package:  # a class defined outside any package (a test's stand-in)
        return None
    name = f"{package}.agreement"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # a missing dependency inside the module is a real error
            raise
        return None
    return getattr(module, "AGREEMENT", None)
