"""Tiny random-weight captioners, built offline from small configs (tests, `--model tiny:KIND`).

    parts = build_tiny("blip", seed=0)          # Parts(kind, model, processor, tokenizer, …)
    save_tiny("qwen2_5_vl", folder, seed=0)     # a local folder `--model FOLDER` loads

Each has the real architecture class at toy width (hidden size 16–32, 1–2 layers) and an offline
tokenizer over lorakit's tiny word list (`lorakit.models.text_encoders.WORDS`), so the captions
are gibberish made of real tokens: enough to test the mechanics (batching, files, resume), never
the quality. Weights are drawn with a large init range (0.5) so that different images give
different captions, which the batching tests need.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from lorakit.caption.captioners import Parts

TINY_KINDS = ("blip", "florence2", "qwen2_vl", "qwen2_5_vl")
"""The model types `build_tiny` knows (`--model tiny:blip` …)."""

_INIT = 0.5

# Qwen2-VL's chat template reduced to what captioning sends: string or list content (image
# entries become the vision placeholder), user turns, and the generation prompt.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for c in message['content'] %}{%- if c['type'] == 'image' %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' %}{{- c['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny(kind: str, seed: int = 0) -> Parts:
    """A tiny captioner of `kind` (one of `TINY_KINDS`) with weights seeded by `seed`."""
    torch.manual_seed(seed)
    if kind == "blip":
        parts = _blip()
    elif kind == "florence2":
        parts = _florence2()
    else:
        parts = _qwen_vl(kind)
    parts.model.eval()
    return parts


def save_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny captioner as a local folder (safetensors weights, config, tokenizer and
    processor files), as `save_pretrained` writes a real one."""
    folder = Path(folder)
    parts = build_tiny(kind, seed)
    parts.model.save_pretrained(folder)
    for part in (parts.processor, parts.tokenizer, parts.image_processor):
        if part is not None:
            part.save_pretrained(folder)
    return folder


# -- BLIP ----------------------------------------------------------------------------------------


def _blip() -> Parts:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    from lorakit.models.text_encoders import WORDS

    # BLIP's tokenizer is BERT's WordPiece plus a [DEC] token that starts every caption.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *dict.fromkeys(WORDS), ",", "."]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok
    )
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
            num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=128,
            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
            initializer_range=_INIT,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
            image_size=32, patch_size=8, initializer_range=_INIT,
        ),
        projection_dim=32,
        initializer_range=_INIT,
    )  # fmt: skip
    return Parts("blip", BlipForConditionalGeneration(config), processor=proc)


# -- Florence-2 ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _bpe_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Byte-level BPE (BART's scheme) trained on the tiny words: deterministic, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lorakit.models.text_encoders import WORDS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(dict.fromkeys(WORDS)), ", . 0 1 2 3 4 5 6 7 8 9"], trainer)
    model = json.loads(tok.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(sorted(model["vocab"].items(), key=lambda kv: kv[1])), merges


def _florence2() -> Parts:
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    vocab, merges = _bpe_vocab_and_merges()
    tok = BartTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=256,
    )
    tok.add_special_tokens({"mask_token": "<mask>"})
    # 64 px through strides 4 and 2 → an 8×8 grid: 64 patch tokens + 1 pooled token.
    image_processor = CLIPImageProcessorPil(
        size={"height": 64, "width": 64},
        crop_size={"height": 64, "width": 64},
        do_center_crop=False,
        image_seq_length=65,
    )
    proc = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    config = Florence2Config(
        vision_config=dict(
            depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
            patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[1, 2], num_groups=[1, 2],
            window_size=4, projection_dim=32, drop_path_rate=0.0, max_position_embeddings=16,
            initializer_range=_INIT,
        ),
        text_config=dict(
            vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=256, dropout=0.0, init_std=_INIT,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.image_token_id,
    )  # fmt: skip
    return Parts("florence2", Florence2ForConditionalGeneration(config), processor=proc)


# -- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------


def _qwen_vl(kind: str) -> Parts:
    import transformers

    from lorakit.models.text_encoders import tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids
    # 4–16 merged patches of 28 px per image: a handful of image tokens.
    image_processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16
    )
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=2,
                  depth=1, initializer_range=_INIT)  # fmt: skip
    if kind == "qwen2_vl":
        vision = dict(common, embed_dim=16, hidden_size=32, mlp_ratio=2)
        config_class = transformers.Qwen2VLConfig
        model_class = transformers.Qwen2VLForConditionalGeneration
    else:
        vision = dict(common, hidden_size=16, intermediate_size=32, out_hidden_size=32,
                      window_size=112, fullatt_block_indexes=[0])  # fmt: skip
        config_class = transformers.Qwen2_5_VLConfig
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    config = config_class(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=2048,
            rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, initializer_range=_INIT,
        ),
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return Parts(kind, model_class(config), tokenizer=tok, image_processor=image_processor)
