"""One typed config tree, resolved in layers.

Resolution order (later wins):
    dataclass defaults ← preset TOML (`presets/NAME.toml`) ← `--config FILE.toml`
    ← repeatable `--set section.key=value` ← named CLI flags (`--model`, `--out`, …)

Every layer is checked against the tree: an unknown section or key, or a value of the wrong type,
raises `ConfigError` naming the key, where it came from and the valid choices. The resolved tree is
written next to the outputs as `config.toml` and can be fed back with `--config`.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import tomli_w

from lorakit.errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class ModelConfig:
    """Which base model to train on."""

    name: str = ""
    """`tiny:sd15` (offline random-weight model), a hub id, a local diffusers folder, or a
    single-file `.safetensors` checkpoint as downloaded from model sites (SD1.5/SDXL; SD3/FLUX:
    transformer from the file, the rest from `single_file_config`)."""
    family: str = "auto"
    """Model family: a key of the family registry (`lorakit.models.FAMILIES`), checked by
    `validate`; `auto` = from `tiny:FAMILY`, `model_index.json` or a checkpoint's keys."""
    revision: str = ""
    """Hub revision (branch, tag or commit); empty = default branch."""
    variant: str = ""
    """Weight variant to load, e.g. `fp16`; empty = full-precision files."""
    allow_pickle: bool = False
    """Allow loading `.bin`/`.ckpt` pickled weights. Off: only safetensors are read."""
    single_file_config: str = ""
    """For a `.safetensors` checkpoint: a local diffusers folder with its configs and tokenizers;
    empty = the family's built-in real configs (tokenizers then from the local HF cache). SD3 and
    FLUX need it: their text encoders, tokenizers and scheduler are read from this folder."""
    t5_max_length: int = 0
    """SD3/FLUX: T5 tokens per caption; 0 = the pipeline's default (SD3 256, FLUX 512)."""
    drop_t5: bool = False
    """SD3: leave the T5 encoder out (saves ~9 GB; T5 tokens are zeros, weaker prompt following)."""
    quantize: Literal["none", "nf4", "int8", "fp8"] = "none"
    """`fp8` (every family, CPU too): store the frozen denoiser's Linear/Conv weights as float8
    e4m3 and compute in the training dtype layer by layer (diffusers' layerwise casting; about
    half the bf16/fp16 bytes). `nf4` / `int8`: load the frozen denoiser's Linear
    layers 4-bit NF4 or 8-bit (bitsandbytes, CUDA only; SD1.5's UNet is mostly convolutions,
    which stay in the compute dtype: fp8 is smaller there, and the run says so)."""
    fp8_matmul: bool = False
    """With `quantize = "fp8"`: the fp8-stored Linear layers multiply in fp8 (`torch._scaled_mm`
    on the stored e4m3 weights, inputs scaled per call, torchao's tensor-wise recipe) instead of
    being widened first. For GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper,
    Blackwell); about 2.4% relative error per layer output, 5% on its input gradient. On the CPU
    the same fp8 products are computed widened (for checking: no speed-up). Not with
    `train.block_swap`."""

    def text_length(self, family_default: int) -> int:
        """The long text encoder's token length: `t5_max_length`, 0 = the family's default.
        The one rule `RunSpec.text_length` and the families' loaders apply."""
        return self.t5_max_length or family_default


@dataclass
class DataConfig:
    """Where the images come from and how they become training samples."""

    resolution: int = 512
    """Training resolution in pixels (images are resized and center-cropped to a square)."""
    caption_ext: str = ".txt"
    """Extension of the caption file next to each image."""
    trigger: str = ""
    """Trigger word. Replaces `[trigger]`/`{trigger}` in captions, else is prefixed when absent."""
    default_caption: str = ""
    """Caption for images without a caption (trigger applied); `{name}` = the file name's words."""
    caption_missing: Literal["template", "model"] = "template"
    """Images without a caption (no caption file, or an empty one): `template` =
    data.default_caption; `model` = captioned by data.caption_model in prepare/train (cached by
    image content in the prepared set; nothing is written next to the images)."""
    caption_model: str = ""
    """Captioner for data.caption_missing = "model" and the `lorakit caption` default: a hub id
    (BLIP, Florence-2, Qwen2-VL/Qwen2.5-VL), a local folder with safetensors weights, or
    `tiny:KIND` (offline random weights, for tests; blip, florence2, qwen2_vl, qwen2_5_vl)."""
    caption_prompt: str = ""
    """Captioner prompt; "" = the model's default: Qwen-VL an instruction to describe the content,
    not the style; Florence-2 `<DETAILED_CAPTION>`; BLIP none (a text here is a prefix)."""
    center_crop: bool = True
    """Center-crop after resizing the short side; off = one random crop per image (seeded)."""
    repeats: int = 1
    """Times each image is seen per epoch; a kohya `N_name` sub-folder sets N for its images."""
    reg_folder: str = ""
    """Class images for DreamBooth prior preservation (e.g. 200 photos of mugs for a LoRA of
    one mug), in any layout prepare reads; "" = none. Every micro-batch of instance images is
    followed by as many class images, and the loss is instance loss + train.prior_weight × class
    loss (lorakit/data/reg.py). Class captions never get data.trigger. Make them with the base
    model: `lorakit class-images DIR --prompt "a photo of a mug" --count 200`. Must not be, hold
    or lie inside the data folder."""
    reg_repeats: int = 1
    """Times each class image appears in one pass of the class-image order (class batches are
    drawn in their own seeded order, as many images per step as instance images)."""
    reg_caption: str = ""
    """Class prompt for class images without a caption file, e.g. `a photo of a mug`; "" =
    data.default_caption with the trigger removed. Must not contain data.trigger."""
    image_column: str = "image"
    """Image column of a `datasets` source (save_to_disk folder or hf:SPEC)."""
    caption_column: str = "text"
    """Caption column of a `datasets` source or imagefolder metadata (else `text`, `caption`)."""
    dataset_split: str = "train"
    """Split of a `datasets` source (DatasetDict folder or hf:SPEC)."""
    shuffle_tags: bool = False
    """Shuffle a caption's comma-separated tags at every step, keeping the first data.keep_tags."""
    keep_tags: int = 1
    """Leading tags that tag shuffling keeps in place (1 keeps a prefixed trigger word first)."""
    caption_dropout: float = 0.0
    """Probability in [0, 1) that a step trains on the empty caption (applied at train time)."""
    bucketing: bool = True
    """Aspect-ratio buckets around data.resolution² (off: one square bucket)."""
    bucket_step: int = 0
    """Bucket side step in px (multiple of 8); 0 = 64, or 8 when data.resolution < 256."""
    bucket_max_ratio: float = 2.0
    """Most elongated bucket allowed (long side / short side)."""
    no_upscale: bool = False
    """Never enlarge an image: one smaller than its bucket gets its own smaller bucket."""
    small_buckets: Literal["error", "merge", "drop"] = "error"
    """Buckets that cannot fill a batch: stop and say so, merge into the nearest, or drop them."""
    background: str = "white"
    """Colour that transparent images are flattened onto (name or #rrggbb)."""
    mask_flatten: bool = False
    """Flatten every image that has a mask FILE (`name.mask.png`, `masks/…`) onto data.background
    through that mask before resizing, as a transparent PNG's alpha is: nothing outside the mask
    reaches the model, not even as context. On by itself with train.masked_loss and
    train.mask_background = 0 (two sets that differ only outside their masks then train
    bit-identical adapters). Off (and mask_background > 0): the surroundings stay in the image as
    context; train.masked_loss only weights how much they are learned (lorakit/data/masks.py)."""
    min_side: int = 0
    """Images with a shorter side are left out; 0 = data.resolution / 2."""
    near_duplicate_distance: int = 4
    """Perceptual-hash distance (bits of 64) that counts as a near duplicate; -1 = no check."""
    max_caption_tokens: int = 75
    """Captions longer than this many tokens are reported (the text encoder cuts them); 0 = off."""
    workers: int = 0
    """Processes that decode and resize images; 0 = one per CPU core."""
    cache_dir: str = ""
    """Folder where raw sources are prepared and kept between runs; "" = prepare in memory."""


@dataclass
class LoraConfigSection:
    """The adapter injected into the denoiser (UNet / transformer)."""

    rank: int = 16
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA path during training."""
    target_modules: list[str] = field(default_factory=list)
    """Module name suffixes that get an adapter; [] = the family's default (attention
    projections: SD1.5/SDXL to_q/to_k/to_v/to_out.0, SD3/FLUX also the text stream's)."""
    init: Literal["default", "gaussian"] = "default"
    """Initialisation of lora_A (lora_B always starts at zero, so step 0 equals the base model)."""
    type: Literal["lora", "loha", "lokr"] = "lora"
    """Adapter kind (peft): `lora`, or LyCORIS `loha` (Hadamard) / `lokr` (Kronecker) — those
    export only as export.formats = ["lycoris"] (`OUT/<name>.lycoris.safetensors`, kohya-style
    keys, read by ComfyUI and A1111/Forge; not by diffusers)."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha/√rank instead of alpha/rank (files store alpha' = alpha·√rank)."""
    use_dora: bool = False
    """DoRA (lora.type = "lora" only): a trained per-output magnitude; exports as "lycoris"
    (`.dora_scale`). ComfyUI and Forge normalise DoRA rows by ‖W‖ where training uses ‖W + ΔW‖,
    so there it acts slightly differently than trained (lorakit/peft apply it exactly). Not
    exportable on FLUX/SD3's `norm_out.linear` or SD3's last `norm1_context.linear` (those loaders
    swap that update's halves but not its magnitude)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: a table of module-name regex/suffix → rank (peft rank_pattern)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: a table of module-name regex/suffix → alpha (peft
    alpha_pattern)."""
    train_text_encoder: bool = False
    """Also train a LoRA on the CLIP text encoder(s); captions are then encoded every step."""
    text_encoder_rank: int = 0
    """Rank of the text-encoder LoRA; 0 = lora.rank."""
    text_encoder_alpha: float = 0.0
    """Alpha of the text-encoder LoRA; 0 = lora.alpha."""
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    """Text-encoder module name suffixes that get an adapter (add `fc1`, `fc2` for the MLPs)."""


@dataclass
class TrainConfig:
    """The optimisation itself."""

    out: str = "runs/lorakit"
    """Output folder: adapters, `config.toml`, `samples/`, `checkpoints/`."""
    overwrite: bool = False
    """Replace a finished or aborted run in `train.out` (off: refuse, nothing is touched)."""
    steps: int = 1000
    """Number of optimizer steps."""
    batch_size: int = 1
    """Images per step (per device)."""
    grad_accum: int = 1
    """Gradient accumulation: micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Multiply train.lr by k or √k, k = global batch (batch × grad_accum × processes)."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    optimizer: Literal[
        "adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor", "prodigy"
    ] = "adamw8bit"
    """`adamw` (torch), `adamw8bit`/`paged_adamw8bit`/`lion8bit` (bitsandbytes 8-bit state),
    `adafactor` (fixed lr) or `prodigy` (set train.lr = 1.0); see lorakit/optim.py."""
    optimizer_fallback: bool = False
    """If a bitsandbytes optimizer cannot run here, fall back to torch AdamW instead of stopping."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 = off."""
    noise_offset: float = 0.0
    """Noise offset (eps/v models): per-channel constant noise; helps very dark/light images."""
    min_snr_gamma: float = 0.0
    """Min-SNR loss weighting γ for eps/v models (5 is common); 0 = off."""
    timestep_sampling: Literal["uniform", "logit_normal", "sigmoid", "shift"] = "shift"
    """SD3/FLUX sigma sampler; `shift` = logit-normal, then the family's shift (models/flow.py)."""
    logit_mean: float = 0.0
    """SD3/FLUX: mean of the logit-normal sigma sampler."""
    logit_std: float = 1.0
    """SD3/FLUX: standard deviation (scale) of the logit-normal / sigmoid sigma sampler."""
    flow_shift: float = 0.0
    """SD3/FLUX `shift` sampler: constant shift; 0 = family default (SD3 3, FLUX by resolution)."""
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """SD3/FLUX loss weighting over sigmas (diffusers' `compute_loss_weighting_for_sd3`)."""
    masked_loss: bool = False
    """Weight the loss by each image's mask: a mask file (`name.mask.png` next to the image, or
    `masks/` at the data root mirroring its sub-folders) or the image's alpha channel; white =
    learned, black = weight train.mask_background. Per image the loss is normalised by the mask's
    weight, so its scale does not depend on the mask's area (lorakit/data/masks.py)."""
    mask_background: float = 0.0
    """With train.masked_loss: the loss weight outside the mask, 0.0 (never learned) to 1.0 (as
    inside; masks then change nothing)."""
    guidance: float = 1.0
    """FLUX.1-dev: guidance value fed to the guidance embedding while training (schnell: unused)."""
    timestep_bias: Literal["none", "style", "content"] = "none"
    """Which noise levels training sees more of: `style` = more high-noise steps (composition,
    layout, colour), `content` = more low-noise steps (detail, texture), `none` = the sampler
    as is. DDPM families (SD1.5/SDXL): t = ⌊(1 - u³)·1000⌋ / ⌊u³·1000⌋ instead of uniform; flow
    families: logit σ moved by +ln 3 / -ln 3 after train.timestep_sampling (models/ddpm.py,
    models/flow.py). Held-out scores use the unbiased draws."""
    preserve_weight: float = 0.0
    """Anti-bleed preservation: for every batch, also predict on the caption with the trigger
    replaced by train.preserve_prompt, once with the LoRA off (no gradients) and once with it on,
    and add this weight × the MSE between the two to the loss, so the LoRA changes the output
    only where the trigger is (lorakit/preserve.py). 0 = off; 1 is common. Costs two more
    denoiser forwards and one more backward per batch."""
    preserve_prompt: str = ""
    """What replaces data.trigger in each caption for train.preserve_weight (a class word, e.g.
    `logo` or `coffee packaging`); "" = the empty prompt instead of the caption."""
    prior_weight: float = 1.0
    """DreamBooth prior preservation λ, used when data.reg_folder is set: loss = instance loss
    + λ × class loss, each the mean over its own batch (1.0 as in DreamBooth, diffusers and
    kohya). Costs one more denoiser forward and backward per micro-batch."""
    seed: int = 42
    """Seed for LoRA init, data order, noise and timesteps: same seed, same adapter."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    offload_activations: bool = False
    """With gradient checkpointing on a GPU: keep each checkpointed block's inputs in pinned CPU
    memory between forward and backward (`lorakit/offload.py`); FLUX.1 at 1024 px: ~1.4 GB less
    GPU memory for two host copies per block and step. Same gradients; no effect on CPU runs."""
    block_swap: int = 0
    """Stream the frozen weights of the denoiser's LAST N transformer blocks from pinned host
    memory instead of keeping them on the GPU (`lorakit/blockswap.py`): each is copied in on a
    side stream just before it runs, in forward and in backward, never copied back; LoRA weights
    and optimizer state stay on the GPU. Saves ~(N - 2) blocks of GPU memory for host memory and
    transfer time; same gradients. DiT families only (`lorakit plan --vram GIB` proposes the
    smallest N that fits); 0 = off. An fp8 base (model.quantize = 'fp8') streams as fp8."""
    stream_encoders: bool = False
    """While caching (latents, caption and preview-prompt embeddings) keep the frozen text
    encoders in host memory and copy the weights of their repeated layers to the device one layer
    at a time as each runs, never back (`lorakit/encoder_stream.py`); embeddings, norms and heads
    stay resident. Qwen-Image: 11.7 GiB less GPU memory while caching (Qwen2.5-VL-7B) for one
    host→device copy of the encoder per caption batch: slower caching, bit-identical results.
    Not with text-encoder LoRA or data.shuffle_tags (captions encoded every step)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Frozen weights and autocast dtype; LoRA weights stay in fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when available."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only the final adapter at the end)."""
    save_every_epochs: int = 0
    """Also save a checkpoint every N epochs (0 = off)."""
    keep_last: int = 3
    """Keep the newest N checkpoints (0 = keep all); the final adapter is always kept."""
    resume: str = ""
    """`latest` or a checkpoint folder to continue from exactly; empty = a fresh run."""
    resume_changed_data: bool = False
    """Resume even though the data set differs from the checkpoint's (images or captions added,
    removed or edited); the result is then no longer what an uninterrupted run gives."""
    log_every: int = 10
    """Print / log the smoothed loss every N steps."""
    strict_memory: bool = False
    """On CUDA, refuse to start when `lorakit plan` estimates the run will not fit the GPU
    (off: warn and start anyway)."""
    compile: bool = False
    """torch.compile the denoiser after LoRA injection (first steps slower while it compiles)."""
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"
    """torch.compile backend for `train.compile`: inductor (fastest steps, needs a C++ compiler
    on CPU / Triton on GPU), aot_eager or eager (no code generation: graph capture only)."""
    ema: bool = False
    """Keep an exponential moving average (EMA) of the LoRA weights (`lorakit/ema.py`), updated
    after every optimizer step: it is the main adapter (`OUT/<name>.safetensors`, and in each
    checkpoint; the raw weights beside it under `raw/`), previews and held-out scores use it,
    checkpoints save it and a resume restores it exactly."""
    ema_decay: float = 0.999
    """EMA decay per optimizer step, in (0, 1); it averages over about 1 / (1 - decay) steps.
    Warm-up: step t uses min(train.ema_decay, t / (t + 9)) (diffusers' EMAModel), so a short run
    is not held near its random start."""
    ema_device: Literal["device", "cpu"] = "device"
    """Where the EMA copy lives: `device` beside the LoRA weights (on a GPU: one more copy of the
    LoRA in GPU memory) or `cpu` (host memory; the weights are copied there after every step)."""


@dataclass
class SampleConfig:
    """Preview grids rendered during training (rows = prompts, columns = seeds)."""

    every: int = 0
    """Render a grid at step 0 and every N steps (0 = never)."""
    prompts: str | list[str] = field(default_factory=list)
    """A prompt file (one prompt per line, `#` comments) or a list of prompts."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """One grid column per seed; the same seed gives the same image across runs."""
    steps: int = 20
    """Denoising steps per preview image."""
    guidance: float = 7.5
    """Classifier-free guidance scale."""
    negative: str = ""
    """Negative prompt."""
    width: int = 0
    """Preview width; 0 = data.resolution."""
    height: int = 0
    """Preview height; 0 = data.resolution."""
    scheduler: Literal["default", "euler", "ddim", "dpm++"] = "default"
    """Sampler for previews; `default` = the model's own scheduler."""
    scales: list[float] = field(default_factory=list)
    """LoRA-scale sweep: each seed column repeated at these strengths (0 = base model); [] = off."""
    every_minutes: float = 0.0
    """Also render a grid when this many minutes passed since the last one (0 = off)."""
    every_epochs: int = 0
    """Also render a grid at the end of every N-th epoch (0 = off)."""
    save_individual: bool = False
    """Also write every cell as its own PNG under `samples/step-NNNNNN/`."""


@dataclass
class ExportConfig:
    """Adapter files written at every save and at the end."""

    name: str = "lorakit"
    """File stem of the adapter: `OUT/<name>.safetensors`."""
    formats: list[str] = field(default_factory=lambda: ["kohya", "diffusers"])
    """Formats to write: `kohya` (`OUT/<name>.safetensors`: ComfyUI/A1111/Forge), `diffusers`
    (`OUT/diffusers/pytorch_lora_weights.safetensors`) and/or `lycoris`
    (`OUT/<name>.lycoris.safetensors`; the one format for LoHa/LoKr/DoRA)."""
    title: str = ""
    """`modelspec.title`; empty = export.name."""
    description: str = ""
    """`modelspec.description`."""
    kohya_names: Literal["original", "diffusers"] = "original"
    """kohya key names: `original` (SDXL SGM, FLUX BFL fused, SD3 joint_blocks) or `diffusers`."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Stored LoRA weight dtype of exported files."""


@dataclass
class LogConfig:
    """Experiment trackers (the console progress display is always on)."""

    tensorboard: bool = True
    """Write TensorBoard logs to `OUT/logs` (loss, lr, grad norm, grids) when it is installed."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login)."""
    wandb_project: str = "lorakit"
    """Weights & Biases project name."""


@dataclass
class EvalConfig:
    """Brand-fidelity numbers for the run report: held-out loss, palette ΔE00, Lab EMD, texture."""

    every: int = 0
    """Score the held-out loss every N steps; 0 = at every save (and at step 0 and the end)."""
    images: int = 4
    """Size of the fixed validation subset, picked evenly from the training images (0 = off)."""
    timesteps: int = 4
    """Noise draws (timesteps) per validation image; fixed by eval.seed, averaged."""
    seed: int = 1234
    """Seed of the validation noise and timesteps, independent of train.seed."""
    palette_colors: int = 6
    """Brand-palette size extracted from the training images (k-means in CIELAB); each sample
    grid's palette distance to it is reported in CIEDE2000 ΔE00 (0 = off)."""
    lab_emd: bool = True
    """Report each sample grid's earth mover's distance between its Lab colour histogram and the
    training images' (ΔE76: how far the colour mix is from the brand's)."""
    texture: bool = True
    """Report each sample grid's texture distance to the training images: Gram statistics of a
    fixed random conv net, in units of the training images' spread (needs 2+ images)."""
    bleed: bool = True
    """Score bleed with every held-out loss (needs data.trigger): the mean squared difference
    between the adapter's and the base model's predictions on the held-out captions with the
    trigger removed (0 = the LoRA leaves trigger-less prompts alone). One more denoiser forward
    per held-out draw and score, plus the base model's once per run."""
    pick: Literal["heldout", "fidelity"] = "heldout"
    """Which column recommends the checkpoint in the report: "heldout" (lowest held-out loss;
    palette ΔE00, Lab EMD, texture break ties) or "fidelity" (lowest palette ΔE00, then Lab EMD,
    then texture, each at 3 significant digits; held-out loss breaks ties; needs previews:
    sample.every > 0). `--recipe style` sets "fidelity"."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def to_toml(self) -> str:
        header = "# lorakit resolved config: feed it back with `lorakit train DATA --config THIS`\n"
        return header + tomli_w.dumps(self.to_dict())


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
# Top-level keys a preset or config file may carry besides sections.
META_KEYS = {"description", "preset", "recipe"}


def section_hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def field_docs() -> dict[str, str]:
    """`section.key` → the docstring under that field (parsed from this file's source)."""
    import ast
    import inspect

    out: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(inspect.getmodule(Config)))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for section, cls in SECTIONS.items():
        body = classes[cls.__name__].body
        for node, nxt in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                out[f"{section}.{node.target.id}"] = nxt.value.value  # type: ignore[union-attr]
    return out


# ---------------------------------------------------------------------------------------------
# type checking of user values


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    if origin is dict:
        return f"a table mapping names to {_describe(typing.get_args(hint)[1])} each"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        hint, str(hint)
    )


def _coerce(value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint`, or raise TypeError/ValueError."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        (item,) = typing.get_args(hint)
        return [_coerce(v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(k, key_hint): _coerce(v, value_hint) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError(f"unsupported type {hint}")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_layer(layer: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Validate one layer (nested dict) and return it with values coerced to their types."""
    out: dict[str, dict[str, Any]] = {}
    for section, values in layer.items():
        if section in META_KEYS:
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"Unknown config section '{section}' in {source}. Valid sections: "
                f"{', '.join(SECTIONS)}.{_suggest(section, list(SECTIONS))}"
            )
        if not isinstance(values, dict):
            raise ConfigError(
                f"'{section}' in {source} must be a table of keys (e.g. [{section}] in TOML, or "
                f"--set {section}.KEY=VALUE), not a single value."
            )
        hints = section_hints(section)
        out[section] = {}
        for key, value in values.items():
            if key not in hints:
                valid = ", ".join(f"{section}.{k}" for k in hints)
                raise ConfigError(
                    f"Unknown config key '{section}.{key}' in {source}. Valid keys in "
                    f"[{section}]: {valid}.{_suggest(key, list(hints))}"
                )
            try:
                out[section][key] = _coerce(value, hints[key])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"Config key '{section}.{key}' in {source} must be {_describe(hints[key])}, "
                    f"got {value!r} ({type(value).__name__}). Fix the value and run again."
                ) from None
    return out


def _merge(base: dict[str, dict[str, Any]], layer: dict[str, dict[str, Any]]) -> None:
    for section, values in layer.items():
        base.setdefault(section, {}).update(values)


def parse_set(item: str) -> dict[str, dict[str, Any]]:
    """`section.key=value` → {section: {key: value}}; the value is read as TOML, else as text."""
    if "=" not in item:
        raise ConfigError(
            f"--set '{item}' is not of the form section.key=value "
            "(for example --set train.steps=500)."
        )
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise ConfigError(
            f"--set '{item}': the key must be section.key (for example train.lr), "
            f"with a section among {', '.join(SECTIONS)}."
        )
    section, key = dotted.split(".")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare text, e.g. --set model.name=org/model
    return {section: {key: value}}


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} '{path}' does not exist. Check the path.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e}).") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not valid TOML: {e}. Fix the file.") from None


# ---------------------------------------------------------------------------------------------
# presets


def presets_dir() -> Path:
    """Presets ship inside the wheel (`lorakit/presets`); a source checkout has `presets/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "presets", here.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("lorakit's presets folder is missing from this installation; reinstall it.")


def list_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(presets_dir().glob("*.toml"))}


def preset_path(name: str) -> Path:
    available = list_presets()
    if name not in available:
        raise ConfigError(
            f"Unknown preset '{name}'. Available presets: {', '.join(available)}."
            f"{_suggest(name, list(available))} A path to your own TOML file goes to --config."
        )
    return available[name]


def preset_description(name: str) -> str:
    return str(read_toml(preset_path(name), f"preset '{name}'").get("description", ""))


def list_recipes() -> dict[str, Path]:
    """Recipes (`presets/recipes/*.toml`): config layers for a kind of LoRA that combine with any
    family preset (`--preset sdxl-24gb --recipe product`), applied after the preset and before a
    config file, `--set` and flags. Each may hold a `[requires]` table: dotted key → what to
    pass, for keys only the user can give (the trigger, the class-image folder)."""
    folder = presets_dir() / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def recipe_layer(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(the recipe's config layer, its `[requires]`: dotted key → how to give it)."""
    available = list_recipes()
    if name not in available:
        raise ConfigError(
            f"Unknown recipe '{name}'. Available recipes: {', '.join(available)}."
            f"{_suggest(name, list(available))} (`lorakit presets ls` lists them.)"
        )
    layer = read_toml(available[name], f"recipe '{name}'")
    requires = layer.pop("requires", {})
    return layer, {str(k): str(v) for k, v in requires.items()}


def check_requires(c: Config, recipe: str, requires: dict[str, str]) -> None:
    """ConfigError naming every key the recipe needs that the resolved config leaves empty."""
    missing = []
    for dotted, how in requires.items():
        section, key = dotted.split(".")
        if not getattr(getattr(c, section), key):
            missing.append(f"{dotted} ({how})")
    if missing:
        raise ConfigError(
            f"The {recipe} recipe (--recipe {recipe}) needs "
            + "; ".join(missing)
            + ". Give each with its flag or --set, or leave the recipe out."
        )


# ---------------------------------------------------------------------------------------------
# resolution


def build(merged: dict[str, dict[str, Any]]) -> Config:
    return Config(**{s: SECTIONS[s](**merged.get(s, {})) for s in SECTIONS})


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    recipe: str | None = None,
) -> Config:
    """Resolve the layers into one validated `Config`: defaults, preset, recipe, config file,
    `--set`s, flags (later wins).

    `flags` maps dotted keys to values; `None` values (flags not given) are skipped. A config
    file may name its `preset` and `recipe` (top-level keys) where none is passed.
    """
    merged: dict[str, dict[str, Any]] = check_layer(asdict(Config()), "the defaults")
    file_layer: dict[str, Any] = {}
    if config_file is not None:
        file_layer = read_toml(Path(config_file), "Config file")
        if preset is None and "preset" in file_layer:
            preset = str(file_layer["preset"])
        if recipe is None and "recipe" in file_layer:
            recipe = str(file_layer["recipe"])
    if preset:
        _merge(merged, check_layer(read_toml(preset_path(preset), "preset"), f"preset '{preset}'"))
    requires: dict[str, str] = {}
    if recipe:
        layer, requires = recipe_layer(recipe)
        _merge(merged, check_layer(layer, f"recipe '{recipe}'"))
    if config_file is not None:
        _merge(merged, check_layer(file_layer, f"config file '{config_file}'"))
    for item in sets or []:
        _merge(merged, check_layer(parse_set(item), f"--set {item}"))
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".")
        _merge(merged, check_layer({section: {key: value}}, f"the --{key} flag"))
    config = build(merged)
    if recipe:
        check_requires(config, recipe, requires)
    validate(config)
    return config


def check_stream_encoders(c: Config) -> None:
    """ConfigError when `train.stream_encoders` meets captions encoded every step (read by
    `validate` and `spec.build_spec`)."""
    both = [
        k
        for k, on in (
            ("lora.train_text_encoder", c.lora.train_text_encoder),
            ("data.shuffle_tags", c.data.shuffle_tags),
        )
        if on
    ]
    if c.train.stream_encoders and both:
        raise ConfigError(
            f"Config key 'train.stream_encoders' = true streams the text encoders' weights to the "
            f"device only while captions are cached once, but {' and '.join(both)} = true "
            "encodes the captions again at every training step (lora.train_text_encoder trains "
            "the encoders, data.shuffle_tags changes the caption strings), so the encoders must "
            "stay on the device. Set train.stream_encoders = false, or set "
            "lora.train_text_encoder = false and data.shuffle_tags = false."
        )


def validate(c: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    for section, keys in c.to_dict().items():  # `inf` passes every range check below
        for key, value in keys.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"Config key '{section}.{key}' must be a finite number, got {value}."
                )
    positive = {
        "data.resolution": c.data.resolution,
        "lora.rank": c.lora.rank,
        "train.steps": c.train.steps,
        "train.batch_size": c.train.batch_size,
        "train.grad_accum": c.train.grad_accum,
        "sample.steps": c.sample.steps,
        "train.log_every": c.train.log_every,
        "eval.timesteps": c.eval.timesteps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"Config key '{key}' must be greater than 0, got {value}.")
    for key, value in {
        "train.save_every": c.train.save_every,
        "sample.every": c.sample.every,
        "train.warmup_steps": c.train.warmup_steps,
        "sample.width": c.sample.width,
        "sample.height": c.sample.height,
        "sample.every_minutes": c.sample.every_minutes,
        "eval.every": c.eval.every,
        "eval.images": c.eval.images,
        "eval.palette_colors": c.eval.palette_colors,
        "train.max_grad_norm": c.train.max_grad_norm,
        "train.save_every_epochs": c.train.save_every_epochs,
        "train.keep_last": c.train.keep_last,
        "train.weight_decay": c.train.weight_decay,
        "train.preserve_weight": c.train.preserve_weight,
    }.items():
        if value < 0:
            raise ConfigError(f"Config key '{key}' must be 0 or more, got {value}.")
    if not c.train.lr > 0:
        raise ConfigError(f"Config key 'train.lr' must be greater than 0, got {c.train.lr}.")
    if not 0.0 <= c.train.mask_background <= 1.0:
        raise ConfigError(
            f"Config key 'train.mask_background' is the loss weight outside an image's mask and "
            f"must be in [0, 1], got {c.train.mask_background}: 0 never learns the background, 1 "
            "learns it as much as the masked part. Set it with --set train.mask_background=0.1."
        )
    if not 0.0 < c.train.ema_decay < 1.0:
        raise ConfigError(
            f"Config key 'train.ema_decay' must be in (0, 1), got {c.train.ema_decay}: the "
            "weight the EMA keeps per step (0.999 averages over about 1000 steps, 0.99 over "
            "about 100). Set it with --set train.ema_decay=0.999."
        )
    if c.train.offload_activations and not c.train.gradient_checkpointing:
        raise ConfigError(
            "Config key 'train.offload_activations' = true moves the inputs that gradient "
            "checkpointing keeps to CPU memory, but train.gradient_checkpointing is false. Set "
            "train.gradient_checkpointing = true, or train.offload_activations = false."
        )
    if c.train.block_swap < 0:
        raise ConfigError(
            f"Config key 'train.block_swap' is the number of transformer blocks to stream from "
            f"host memory and must be 0 (off) or more, got {c.train.block_swap}."
        )
    if c.train.block_swap and c.train.compile:
        raise ConfigError(
            "Config keys 'train.block_swap' and 'train.compile' cannot be combined: block swap "
            "streams each block's weights from hooks around the block, which torch.compile "
            "cannot trace. Set train.compile = false, or train.block_swap = 0."
        )
    check_stream_encoders(c)
    from lorakit.preserve import check_preservation  # local: preserve imports torch

    check_preservation(c)
    from lorakit.data.reg import check_prior  # local: data imports torch

    check_prior(c)
    if c.data.resolution % 8:
        raise ConfigError(
            f"Config key 'data.resolution' must be a multiple of 8 (the VAE downsamples by 8), "
            f"got {c.data.resolution}."
        )
    if not 0.0 <= c.lora.dropout < 1.0:
        raise ConfigError(f"Config key 'lora.dropout' must be in [0, 1), got {c.lora.dropout}.")
    if c.lora.text_encoder_rank < 0 or c.lora.text_encoder_alpha < 0:
        raise ConfigError(
            "Config keys 'lora.text_encoder_rank' and 'lora.text_encoder_alpha' must be 0 (= the "
            f"UNet's value) or more, got {c.lora.text_encoder_rank}, {c.lora.text_encoder_alpha}."
        )
    _validate_adapter_kind(c)
    if c.lora.train_text_encoder and not c.lora.text_encoder_target_modules:
        raise ConfigError(
            "Config key 'lora.text_encoder_target_modules' must name at least one module when "
            "lora.train_text_encoder is true (e.g. ['q_proj', 'k_proj', 'v_proj', 'out_proj'])."
        )
    from lorakit.data.prepare import check_data  # local: data imports torch
    from lorakit.export import EXPORTERS  # local: export imports models, which import config
    from lorakit.models import FAMILIES  # local: the families import config

    if c.model.family != "auto" and c.model.family not in FAMILIES:
        raise ConfigError(
            f"Config key 'model.family' is {c.model.family!r}, which is not a model family "
            f"lorakit knows. Valid values: auto, {', '.join(FAMILIES)}. Fix it with --set "
            "model.family=<name> (or 'auto' to tell the family from model.name)."
        )
    check_data(c.data)
    bad = [f for f in c.export.formats if f not in EXPORTERS]
    if bad or not c.export.formats:
        raise ConfigError(
            f"Config key 'export.formats' has {bad or 'no formats'}; valid formats: "
            f"{', '.join(EXPORTERS)}."
        )
    if not c.export.name or any(ch in c.export.name for ch in "/\\"):
        raise ConfigError(
            f"Config key 'export.name' must be a plain file stem without slashes, "
            f"got {c.export.name!r}."
        )
    if not c.sample.seeds:
        raise ConfigError("Config key 'sample.seeds' must list at least one seed.")
    if c.train.logit_std <= 0 or c.train.flow_shift < 0 or c.model.t5_max_length < 0:
        raise ConfigError(
            "Config keys 'train.logit_std' must be > 0, 'train.flow_shift' and "
            "'model.t5_max_length' must be 0 or more; got "
            f"{c.train.logit_std}, {c.train.flow_shift}, {c.model.t5_max_length}."
        )
    if c.model.fp8_matmul and c.model.quantize != "fp8":
        raise ConfigError(
            "model.fp8_matmul = true multiplies with the fp8-stored base weights, but "
            f"model.quantize = '{c.model.quantize}'. Set model.quantize = 'fp8' as well, or "
            "model.fp8_matmul = false."
        )
    if c.model.fp8_matmul and c.train.block_swap:
        raise ConfigError(
            "model.fp8_matmul and train.block_swap cannot be combined yet: the streamed blocks "
            "read their fp8 weights from the swap slots through their own casts. Set "
            "model.fp8_matmul = false (fp8 storage alone streams as fp8), or train.block_swap = 0."
        )
    if c.model.quantize in ("nf4", "int8") and c.train.device == "cpu":  # fp8 works on the CPU
        raise ConfigError(
            f"model.quantize = '{c.model.quantize}' needs a CUDA GPU (bitsandbytes 4/8-bit "
            "weights), but train.device = 'cpu'. Set model.quantize = 'none' to train on the CPU."
        )


def _validate_adapter_kind(c: Config) -> None:
    """lora.type / use_dora / use_rslora / patterns: combinations peft and the formats support."""
    import re

    lo = c.lora
    if lo.type != "lora" and (lo.use_dora or lo.use_rslora):
        raise ConfigError(
            f"lora.use_dora / lora.use_rslora apply to lora.type = 'lora' only, but lora.type = "
            f"'{lo.type}'. Set them to false, or lora.type = 'lora'."
        )
    patterns = {"lora.rank_pattern": lo.rank_pattern, "lora.alpha_pattern": lo.alpha_pattern}
    for key, table in patterns.items():
        for pattern, value in table.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(
                    f"Config key '{key}' has the pattern {pattern!r}, which is not a valid regular "
                    f"expression ({e}). Use a module name suffix such as 'to_q' or 'attn1.to_k'."
                ) from None
            if not value > 0:
                raise ConfigError(
                    f"Config key '{key}' maps {pattern!r} to {value}; use a value > 0."
                )
    if lo.type != "lora" or lo.use_dora:
        kind = "DoRA" if lo.use_dora else lo.type
        plain = [f for f in c.export.formats if f in ("kohya", "diffusers")]
        if plain:
            raise ConfigError(
                f"A {kind} adapter (lora.type / lora.use_dora) cannot be written in the plain LoRA "
                f"format(s) {plain}: they hold only lora_down/lora_up pairs. Set export.formats = "
                "['lycoris'] (kohya key names with LyCORIS tensors: ComfyUI, A1111/Forge and "
                "LyCORIS read it), or train a plain LoRA."
            )
