"""Text encoders shared by the families: fixed module tables, configs and tiny offline builds.

Families import these; they never import each other.

- CLIP ViT-L/14 (SD1.5 `text_encoder`; SDXL, SD3, FLUX `text_encoder`) and OpenCLIP ViT-bigG/14
  (SDXL `text_encoder_2`, SD3 `text_encoder_2`): the real configs (`CLIP_L_TEXT`,
  `OPENCLIP_BIGG_TEXT`), their LoRA-able projections (`clip_l_modules`, `openclip_bigg_modules`)
  and a tiny offline config (`TINY_CLIP`, `tiny_clip`).
- T5 v1.1 XXL encoder (SD3 `text_encoder_3`, FLUX `text_encoder_2`): the real config (`T5_XXL`),
  its module table (`t5_xxl_modules`) and a tiny config (`tiny_t5_config`).
- Offline tokenizers for the tiny models (`tiny_clip_tokenizer`, `tiny_t5_tokenizer`).

## T5 module table
Fixed module table of the T5 v1.1 XXL encoder (FLUX.1's `text_encoder_2`, SD3's
`text_encoder_3`), for adapters that carry T5 LoRA keys.

lorakit never trains T5, but kohya sd-scripts does (`train_t5xxl=True` in `networks/lora_flux.py`
puts a LoRA on every Linear of `T5Attention` and `T5DenseGatedActDense`, keys
`lora_te3_encoder_block_{i}_layer_0_SelfAttention_{q,k,v,o}` and
`lora_te3_encoder_block_{i}_layer_1_DenseReluDense_{wi_0,wi_1,wo}`), and ComfyUI and Forge load
those keys. Reading them against this table lets lorakit keep, apply and re-export them instead
of calling the whole file foreign. `relative_attention_bias` is an Embedding, never a LoRA target.

## Tiny CLIP tokenizer
An offline CLIP tokenizer for tiny test models: byte-level BPE over a fixed word list.

Real CLIP tokenizers come from the hub; tests and the demo must run offline, so we write a small
`vocab.json` + `merges.txt` in CLIP's format and load it through the normal `from_pretrained`
path. Words in `WORDS` become single tokens (when BPE merge order allows), everything else falls
back to characters, so captions stay well inside 77 tokens.

## Tiny T5 tokenizer
An offline T5 tokenizer for tiny SD3/FLUX models: a Unigram model over a fixed word list.

Real T5 tokenizers are sentencepiece models from the hub. Tests and the demo run offline, so we
build a `tokenizer.json` with the `tokenizers` library (Unigram + Metaspace like T5's sentencepiece,
and an `</s>` post-processor, which T5 appends to every sequence) and wrap it in transformers' T5
tokenizer class. `save_pretrained` writes `tokenizer.json`, which `from_pretrained` (and so a saved
diffusers folder) reads back identically. Ids: `<pad>` 0, `</s>` 1, `<unk>` 2, as in T5.
"""

from __future__ import annotations

import json
import shutil
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch

# --- CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 ------------------------------------------------------


@cache
def clip_l_modules(layers: int = 12) -> frozenset[str]:
    """CLIP ViT-L/14 text encoder projections, with the `text_model.` level all formats use."""
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    leaves += ("mlp.fc1", "mlp.fc2")
    return frozenset(
        f"text_model.encoder.layers.{i}.{leaf}" for i in range(layers) for leaf in leaves
    )


@cache
def openclip_bigg_modules(layers: int = 32) -> frozenset[str]:
    """OpenCLIP ViT-bigG/14 text tower (text_encoder_2): same projection names as CLIP-L."""
    return clip_l_modules(layers)


# OpenAI CLIP ViT-L/14 text tower. bos/eos/pad ids as in the SD repos: eos_token_id = 2 selects
# transformers' legacy pooling (argmax of the ids = the end token), which these models expect.
CLIP_L_TEXT = dict(
    architectures=["CLIPTextModel"],
    model_type="clip_text_model",
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,
    hidden_act="quick_gelu",
    hidden_size=768,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=3072,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    num_attention_heads=12,
    num_hidden_layers=12,
    pad_token_id=1,
    projection_dim=768,
    vocab_size=49408,
)
OPENCLIP_BIGG_TEXT = dict(
    CLIP_L_TEXT,
    architectures=["CLIPTextModelWithProjection"],
    hidden_act="gelu",
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
)
# Tiny CLIP text tower for the offline test models (same module names, small widths).
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    attention_dropout=0.0,
    dropout=0.0,
)


def clip_from_config(config: dict[str, Any], with_projection: bool) -> torch.nn.Module:
    """A CLIP text tower from one of the real configs above (random weights; build it under
    `accelerate.init_empty_weights` for a meta-device model)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    conf = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(conf)


def tiny_clip(tokenizer, with_projection: bool = True, seed: int = 0):
    """A tiny CLIP text tower (`TINY_CLIP`) for `tokenizer`, seeded with `seed`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CLIP,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


# --- T5 v1.1 XXL ---------------------------------------------------------------------------------

T5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0,
    is_encoder_decoder=False, use_cache=False,
)  # fmt: skip
"""google/t5-v1_1-xxl encoder (SD3 `text_encoder_3`, FLUX `text_encoder_2`), 4.76 B params."""


def t5_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """A `T5EncoderModel` from a config dict such as `T5_XXL` (random weights)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config))


def tiny_t5_config(vocab_size: int, d_model: int):
    """A tiny T5 encoder config (2 blocks, gated-GELU, no dropout) of width `d_model`."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,  # frozen parts must be deterministic (T5's default is 0.1)
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


T5_XXL_LAYERS = 24
"""google/t5-v1_1-xxl encoder blocks (FLUX.1 and SD3 both use this encoder)."""


def t5_encoder_modules(num_layers: int = T5_XXL_LAYERS) -> frozenset[str]:
    """Linear modules of `T5EncoderModel` (gated-GELU feed-forward) in transformers' names."""
    names = set()
    for i in range(num_layers):
        b = f"encoder.block.{i}.layer"
        names |= {f"{b}.0.SelfAttention.{p}" for p in ("q", "k", "v", "o")}
        names |= {f"{b}.1.DenseReluDense.{p}" for p in ("wi_0", "wi_1", "wo")}
    return frozenset(names)


@cache
def t5_xxl_modules() -> frozenset[str]:
    return t5_encoder_modules(T5_XXL_LAYERS)


# --- tiny offline CLIP tokenizer ---------------------------------------------------------------

WORDS = """
a an the and or of in on with for to at by from as is are this that it its style photo
illustration flat vector poster logo emblem brand wave sun sunset sea coastal coffee cup mug bag
package tote card business sign storefront label bottle pattern tile teal coral cream mustard
ink white black red blue green yellow orange pink purple brown grey gray dark light background
table shop street city window wall paper print minimal simple clean bold color colors colour
palette design graphic studio product shot close up view front side top icon shape stripes
stripe circle half disc lines shapes modern retro vintage art drawing painting texture
""".split()  # noqa: SIM905


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            pair = (current, nxt)
            if pair not in merges:
                merges.append(pair)
            current = current + nxt
            if current not in tokens:
                tokens.append(current)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: Path) -> None:
    vocab, merges = vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tiny_clip_tokenizer(max_length: int = 77):
    """CLIP BPE tokenizer over the tiny vocabulary, offline. Its files live only while it is
    read (the tokenizer keeps its vocabulary in memory): a folder left per process piled up."""
    from transformers import CLIPTokenizer

    from lorakit.fileio import owned_tempdir

    folder = owned_tempdir("lorakit-tiny-tok-")  # also removes those of killed processes
    try:
        write_tokenizer_files(Path(folder))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- tiny offline T5 tokenizer -----------------------------------------------------------------

_CHARS = [chr(c) for c in range(33, 127)]


@lru_cache(maxsize=1)
def _t5_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [(f"▁{w}", -2.0) for w in dict.fromkeys(WORDS)]
    vocab += [(c, -6.0) for c in _CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok.to_str()


def tiny_t5_tokenizer(max_length: int = 512):
    """A transformers T5 tokenizer (fast, `tokenizers`-backed); ~200 tokens, offline."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        tokenizer_object=Tokenizer.from_str(_t5_tokenizer_json()),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


# --- tiny offline Qwen tokenizer ---------------------------------------------------------------
# Qwen2.5-VL (Qwen-Image) and Qwen3 (FLUX.2 klein, Z-Image) share Qwen2's byte-level BPE
# tokenizer. The tiny one keeps its special tokens, its pre-tokenisation (a word carries its
# leading space, `Ġword`) and a Qwen3-style chat template, over a small vocabulary: the brand
# words plus the words of Qwen-Image's system prompt, so that prompt's prefix is 34 tokens long
# here as in the real tokenizer (`QwenImagePipeline.prompt_template_encode_start_idx` drops
# exactly that many hidden states).

QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<think>", "</think>",
)  # fmt: skip

_QWEN_EXTRA_WORDS = """
system user assistant Describe describe image by detailing color shape size texture quantity
text spatial relationships objects background
""".split()  # noqa: SIM905

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
"""Qwen3's template reduced to what the pipelines use: user turns, the generation prompt, and
the empty think block `enable_thinking=False` adds."""


@lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    # Trained, not hand-written: BPE applies merges by rank across the whole word, so a
    # hand-built merge list splits words unpredictably; merges learned on the words themselves
    # re-assemble every one of them. Deterministic (same corpus, same merges).
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = list(dict.fromkeys(WORDS + _QWEN_EXTRA_WORDS))
    corpus = [" ".join(words), "\n".join(words), ", : . ! ? - ' \" 0 1 2 3 4 5 6 7 8 9"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    vocab = tuple(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    return vocab, merges


def tiny_qwen_tokenizer(max_length: int = 1024):
    """A transformers `Qwen2Tokenizer` (fast), offline: byte-level BPE over the tiny words, the
    Qwen special tokens (`<|endoftext|>` pads), and `QWEN_CHAT_TEMPLATE`."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab_and_merges()
    tok = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok
