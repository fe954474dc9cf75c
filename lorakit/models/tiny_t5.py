"""An offline T5 tokenizer for tiny SD3/FLUX models: a Unigram model over a fixed word list.

Real T5 tokenizers are sentencepiece models from the hub. Tests and the demo run offline, so we
build a `tokenizer.json` with the `tokenizers` library (Unigram + Metaspace like T5's sentencepiece,
and an `</s>` post-processor, which T5 appends to every sequence) and wrap it in transformers' T5
tokenizer class. `save_pretrained` writes `tokenizer.json`, which `from_pretrained` (and so a saved
diffusers folder) reads back identically. Ids: `<pad>` 0, `</s>` 1, `<unk>` 2, as in T5.
"""

from __future__ import annotations

from functools import lru_cache

from lorakit.models.tiny_tokenizer import WORDS

_CHARS = [chr(c) for c in range(33, 127)]


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
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
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )
