"""Image-to-text models that write captions, loaded natively by transformers.

    cap = load_captioner("Qwen/Qwen2.5-VL-7B-Instruct", prompt="", device="auto")
    cap.caption([pil_image, …])  ->  ["a paper cup on a wooden counter", …]   (one per image)

A captioner is named like a base model: `tiny:KIND` (an offline random-weight one, see
`lorakit.caption.tiny`), a local folder holding `config.json`, the weights and the
tokenizer/processor files, or a hub id. Its kind comes from `config.json`'s `model_type`:

    model_type            class                                  prompt
    blip                  BlipForConditionalGeneration           a prefix the caption continues
    florence2             Florence2ForConditionalGeneration      a task token (<DETAILED_CAPTION>)
    qwen2_vl, qwen2_5_vl  Qwen2(_5)_VLForConditionalGeneration   the instruction (chat VLM)

Never `trust_remote_code`: only architectures transformers ships are loaded (a Florence-2 repo
in Microsoft's original remote-code layout is not; use the native `florence-community/…`
conversions). Weights are read from safetensors only, unless `allow_pickle` (the
`--allow-pickle` consent) allows `.bin` files, which transformers reads tensors-only.

Generation is greedy (`do_sample=False`, one beam): the same image and model give the same
caption, in a batch or alone (checked in fp32; in bf16/fp16 on a GPU a batch's padding changes
the rounding, which can flip a near-tie between two words). Images reach the model as RGB,
EXIF-rotated, transparency flattened onto `data.background`, at most `MAX_PIXELS` (larger ones
are downscaled first: a chat VLM's image tokens grow with the pixels, and captions do not need
more).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

CAPTION_VERSION = 1
"""Part of every cached caption's key: bump when the text a captioner returns changes."""

MAX_PIXELS = 1024 * 1024

CONTENT_PROMPT = (
    "Describe what this image shows in one or two plain sentences, as a caption for training "
    "an image model: the main subject, the objects and people, how they are arranged, the "
    "setting, and any visible text in quotes. Describe the content only: do not mention the "
    "art style, medium, colour palette, lighting or mood, and do not begin with 'The image'."
)
"""The chat VLMs' default instruction. Content, not style: a style LoRA should bind the look to
the trigger word, and every style word in the captions would take part of it instead."""


@dataclass(frozen=True)
class Kind:
    """One supported `model_type`: its transformers class, how it is prompted, its default."""

    label: str
    model_class: str
    style: str
    """`prefix` (BLIP), `task` (Florence-2) or `chat` (Qwen-VL)."""
    default_prompt: str


KINDS: dict[str, Kind] = {
    "blip": Kind("BLIP", "BlipForConditionalGeneration", "prefix", ""),
    "florence2": Kind(
        "Florence-2", "Florence2ForConditionalGeneration", "task", "<DETAILED_CAPTION>"
    ),
    "qwen2_vl": Kind("Qwen2-VL", "Qwen2VLForConditionalGeneration", "chat", CONTENT_PROMPT),
    "qwen2_5_vl": Kind("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "chat", CONTENT_PROMPT),
}

EXAMPLES = (
    "Salesforce/blip-image-captioning-large, florence-community/Florence-2-large or "
    "Qwen/Qwen2.5-VL-7B-Instruct"
)

_PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt")

# Qwen2-VL's chat template renders one user turn with an image as exactly this (its default
# system turn included); used when a tokenizer carries no template of its own.
_QWEN_VL_FALLBACK = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass
class Parts:
    """A loaded captioner's pieces: the model and what turns images and text into its inputs
    (`processor` for BLIP/Florence-2; `tokenizer` + `image_processor` for the chat VLMs, whose
    processor classes need torchvision for their video half, which captioning never uses)."""

    kind: str
    model: Any
    processor: Any = None
    tokenizer: Any = None
    image_processor: Any = None


# -- naming and checking a captioner -------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a captioner comes from: `tiny`, `local` (a folder) or `hub` (an id)."""

    name: str
    where: str
    model_type: str
    identity: str
    """Stable text that changes when the weights or config do (cache keys): `tiny:KIND`, the
    folder's config and weight-file digests, or `hub:ID`."""
    pickled: bool = False


def describe(name: str, allow_pickle: bool = False, pickle_fix: str = "") -> Source:
    """Check a captioner name without loading any weights: the kind is supported, a folder has
    safetensors weights (or pickles with consent). Raises `LorakitError` naming the fix;
    `pickle_fix` replaces the default one for pickle-only folders (pass --allow-pickle)."""
    from lorakit.caption.tiny import TINY_KINDS

    if not name:
        raise LorakitError(
            "No captioner named. Pass --model (a hub id or a local folder, e.g. "
            f"{EXAMPLES}), or set data.caption_model."
        )
    if name.startswith("tiny:"):
        kind = name[5:]
        if kind not in TINY_KINDS:
            raise LorakitError(
                f"Unknown tiny captioner '{name}'. Offline tiny captioners: "
                f"{', '.join('tiny:' + k for k in TINY_KINDS)}."
            )
        return Source(name, "tiny", kind, name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _describe_folder(name, path, allow_pickle, pickle_fix)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LorakitError(
            f"The captioner '{name}' is neither a folder nor a hub id (org/name). Pass a local "
            f"folder with config.json and safetensors weights, or a hub id such as {EXAMPLES}."
        )
    return _describe_hub(name)


def _describe_folder(name: str, path: Path, allow_pickle: bool, pickle_fix: str) -> Source:
    config = path / "config.json"
    if not config.is_file():
        raise LorakitError(
            f"The captioner folder '{name}' has no config.json, so it is not a transformers model "
            "folder. Pass the folder that `save_pretrained` wrote (config.json, "
            f"model.safetensors, tokenizer/processor files), or a hub id such as {EXAMPLES}."
        )
    model_type = _model_type(config, name)
    safe = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in _PICKLE_EXTS and p.is_file())
    if not safe and not pickles:
        raise LorakitError(
            f"The captioner folder '{name}' holds no weights (no *.safetensors file next to its "
            "config.json). Copy the model's model.safetensors (or all its shards with "
            "model.safetensors.index.json) into it, or pass a hub id such as "
            f"{EXAMPLES}."
        )
    if not safe and not allow_pickle:
        raise LorakitError(
            f"The captioner folder '{name}' has only pickled weights "
            f"({', '.join(p.name for p in pickles[:3])}), and lorakit does not unpickle files "
            "without your consent (a pickle can run code when read). "
            + (
                pickle_fix
                or "Convert them to safetensors, or pass --allow-pickle if you trust the source "
                "(transformers then reads tensors only)."
            )
        )
    digest = hashlib.sha256(config.read_bytes())
    for f in safe or pickles:
        digest.update(f"{f.name}|{f.stat().st_size}|{_ends_digest(f)}".encode())
    return Source(name, "local", model_type, f"local:{digest.hexdigest()}", pickled=not safe)


def _ends_digest(path: Path, span: int = 1 << 20) -> str:
    """sha256 of a weight file's first and last MiB: cheap (a 15 GB model is not read whole on
    every run) and it moves with any re-save, as the header at the start lists every tensor."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        size = f.seek(0, 2)
        f.seek(max(0, size - span))
        h.update(f.read(span))
    return h.hexdigest()


def _model_type(config: Path, name: str) -> str:
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError) as e:
        raise LorakitError(
            f"The captioner '{name}' has a config.json that cannot be read ({e}). Replace it with "
            "the model's original config.json."
        ) from None
    if model_type not in KINDS:
        raise LorakitError(
            f"The captioner '{name}' is a '{model_type or 'unnamed'}' model (config.json "
            "model_type), which lorakit cannot caption with. Supported model types: "
            + ", ".join(f"{k} ({v.label})" for k, v in KINDS.items())
            + f". Pass one of those with --model, e.g. {EXAMPLES}."
        )
    return model_type


def _describe_hub(name: str) -> Source:
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(name, "config.json"))
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorakitError(
            f"Could not read the captioner '{name}' from the Hugging Face hub ({first}). Check the "
            "id and that you are online (or logged in for a gated model), or pass a local "
            "folder with config.json and safetensors weights."
        ) from None
    return Source(name, "hub", _model_type(config, name), f"hub:{name}")


# -- loading -------------------------------------------------------------------------------------


def pick_device(device: str):
    """`auto`: CUDA when available, else the CPU. Returns (torch.device, dtype): bf16 on a GPU
    that has it, else fp16; fp32 on the CPU (fp16 matmuls there are slow or missing)."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise LorakitError(f"--device '{device}' is unknown; choose auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise LorakitError("--device cuda was asked for, but no CUDA GPU is visible here.")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), torch.float32
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cuda"), dtype


def load_parts(source: Source, dtype, allow_pickle: bool = False) -> Parts:
    """The model (in `dtype`, eval mode) and its input processing for `source`."""
    import transformers

    if source.where == "tiny":
        from lorakit.caption.tiny import build_tiny

        parts = build_tiny(source.model_type)
        parts.model.to(dtype)
        return parts
    kind = KINDS[source.model_type]
    model_class = getattr(transformers, kind.model_class, None)
    if model_class is None:
        raise LorakitError(
            f"The captioner '{source.name}' is a {kind.label} model, but the installed "
            f"transformers {transformers.__version__} has no {kind.model_class}. Upgrade it "
            "(pip install -U transformers), or choose another captioner."
        )
    try:
        # without consent safetensors only; with it, a folder of pickles reads them, and a hub
        # repo prefers its safetensors and falls back to .bin (None)
        use_safetensors = True if not allow_pickle else (False if source.pickled else None)
        model = model_class.from_pretrained(
            source.name, dtype=dtype, use_safetensors=use_safetensors
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        hint = (
            " It has only pickled weights (.bin): convert them to safetensors, or pass "
            "--allow-pickle if you trust the source."
            if "safetensors" in first.lower() and not allow_pickle
            else ""
        )
        raise LorakitError(
            f"Could not load the {kind.label} captioner '{source.name}': {first}.{hint} Pass a "
            "folder that `save_pretrained` wrote (config.json, safetensors weights, "
            "tokenizer/processor files) or a hub id you can reach."
        ) from None
    model.eval()
    try:
        if kind.style == "chat":
            parts = Parts(
                source.model_type,
                model,
                tokenizer=transformers.AutoTokenizer.from_pretrained(source.name),
                image_processor=transformers.AutoImageProcessor.from_pretrained(source.name),
            )
        else:
            processor = transformers.AutoProcessor.from_pretrained(source.name)
            parts = Parts(source.model_type, model, processor=processor)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise LorakitError(
            f"The captioner '{source.name}' has weights, but its tokenizer or image processor "
            f"cannot be loaded ({first}). Copy the model's tokenizer and "
            "preprocessor_config.json files into the folder (they come with the model), or "
            "pass a hub id."
        ) from None
    return parts


# -- captioning ----------------------------------------------------------------------------------


@dataclass
class Captioner:
    """A loaded captioner: `caption(images)` returns one cleaned caption per image, in order."""

    parts: Parts
    source: Source
    prompt: str
    max_new_tokens: int
    device: Any
    dtype: Any
    _template: str = field(default="", repr=False)

    @property
    def kind(self) -> Kind:
        return KINDS[self.parts.kind]

    def caption(self, images: list) -> list[str]:
        """Captions for PIL RGB images (`open_image`); greedy, batched as given."""
        import torch

        if not images:
            return []
        style = self.kind.style
        try:
            with torch.inference_mode():
                texts = self._chat(images) if style == "chat" else self._encoder_decoder(images)
        except torch.OutOfMemoryError:
            raise LorakitError(out_of_memory(self.source.name, len(images))) from None
        return [clean_caption(t) for t in texts]

    def _generate(self, inputs: dict) -> Any:
        import torch

        moved = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            moved[k] = v
        return self.parts.model.generate(
            **moved, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
        )

    def _encoder_decoder(self, images: list) -> list[str]:
        proc = self.parts.processor
        n = len(images)
        # Florence-2 always takes a task or instruction; BLIP's prompt is a prefix that each
        # caption continues (and keeps in its text), and BLIP captions freely without one.
        try:
            if self.kind.style == "task" or self.prompt:
                inputs = proc(images=images, text=[self.prompt] * n, return_tensors="pt")
            else:
                inputs = proc(images=images, return_tensors="pt")
        except ValueError as e:  # e.g. Florence-2: a task token with more text after it
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LorakitError(
                f"The {self.kind.label} captioner refused the prompt {self.prompt!r} ({first}). "
                "Fix --prompt (data.caption_prompt), or leave it empty for the model's default."
            ) from None
        inputs.pop("token_type_ids", None)
        out = self._generate(dict(inputs))
        return proc.batch_decode(out, skip_special_tokens=True)

    def _chat(self, images: list) -> list[str]:
        tok, improc = self.parts.tokenizer, self.parts.image_processor
        if not self._template:
            self._template = chat_prompt(tok, self.prompt)
        pixels = improc(images=images, return_tensors="pt")
        merge = getattr(improc, "merge_size", 2) ** 2
        # The processor's own step: one <|image_pad|> per merged patch of each image.
        texts = [
            self._template.replace("<|image_pad|>", "<|image_pad|>" * (int(g.prod()) // merge))
            for g in pixels["image_grid_thw"]
        ]
        tok.padding_side = "left"  # decoder-only: new tokens must follow every prompt directly
        enc = tok(texts, return_tensors="pt", padding=True)
        out = self._generate({**enc, **pixels})
        return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def chat_prompt(tokenizer, prompt: str) -> str:
    """One user turn holding the image and `prompt`, rendered by the tokenizer's chat template
    (Qwen2-VL's own rendering when it has none), ending with the assistant's turn opening."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = ""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # a template written for other message shapes: use Qwen's own
            text = ""
    if not isinstance(text, str) or text.count("<|image_pad|>") != 1:
        text = _QWEN_VL_FALLBACK.format(prompt=prompt)
    return text


def load_captioner(
    name: str,
    *,
    prompt: str = "",
    max_new_tokens: int = 96,
    device: str = "auto",
    allow_pickle: bool = False,
    source: Source | None = None,
) -> Captioner:
    """Check, then load the captioner `name`; `prompt` "" = the kind's default (`KINDS`)."""
    import torch

    source = source or describe(name, allow_pickle)
    dev, dtype = pick_device(device)
    parts = load_parts(source, dtype, allow_pickle)
    try:
        parts.model.to(dev)
    except torch.OutOfMemoryError:
        raise LorakitError(out_of_memory(name, 0)) from None
    return Captioner(
        parts,
        source,
        prompt or KINDS[source.model_type].default_prompt,
        max_new_tokens,
        dev,
        dtype,
    )


def out_of_memory(name: str, batch: int) -> str:
    """The paragraph for a captioner that does not fit the GPU (loading: `batch` = 0)."""
    what = f"captioning a batch of {batch} image(s)" if batch else "loading it"
    return (
        f"The GPU ran out of memory {what} with the captioner '{name}'; no caption of that "
        "batch was written. Choose a smaller captioner (e.g. Qwen/Qwen2.5-VL-3B-Instruct or "
        "florence-community/Florence-2-large), or run `lorakit caption` with --batch-size 1, "
        "or with --device cpu (slow): it writes caption files that prepare and train then use."
    )


def fingerprint(source: Source, prompt: str, max_new_tokens: int) -> str:
    """What a cached caption depends on: the model's identity, the prompt and the length."""
    effective = prompt or KINDS[source.model_type].default_prompt
    text = f"{CAPTION_VERSION}|{source.identity}|{effective}|{max_new_tokens}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_SPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """One line: control characters dropped, whitespace collapsed, wrapping quotes removed."""
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = _SPACE.sub(" ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


# -- images --------------------------------------------------------------------------------------


def open_image(raw: bytes | Path, name: str, background=(255, 255, 255)):
    """A fully decoded RGB PIL image from a file or its bytes: EXIF orientation applied,
    transparency flattened onto `background`, downscaled to at most `MAX_PIXELS`. An image that
    cannot be decoded raises `LorakitError` naming it."""
    from PIL import Image, ImageOps

    try:
        src = Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw)
        with src:
            im = ImageOps.exif_transpose(src)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (*background, 255))
                im = Image.alpha_composite(flat, rgba)
            im = im.convert("RGB")
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise LorakitError(
            f"Image '{name}' cannot be read ({e}); nothing was written. Remove or replace the "
            "file (or move it out of the folder), then run again."
        ) from None
    if im.width * im.height > MAX_PIXELS:
        scale = (MAX_PIXELS / (im.width * im.height)) ** 0.5
        size = (max(1, int(im.width * scale)), max(1, int(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
    return im
