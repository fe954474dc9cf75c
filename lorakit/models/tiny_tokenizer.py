"""An offline CLIP tokenizer for tiny test models: byte-level BPE over a fixed word list.

Real CLIP tokenizers come from the hub; tests and the demo must run offline, so we write a small
`vocab.json` + `merges.txt` in CLIP's format and load it through the normal `from_pretrained`
path. Words in `WORDS` become single tokens (when BPE merge order allows), everything else falls
back to characters, so captions stay well inside 77 tokens.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

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


@lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    folder = Path(tempfile.mkdtemp(prefix="lorakit-tiny-tok-"))
    write_tokenizer_files(folder)
    return str(folder)


def tiny_clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(_tokenizer_dir(), model_max_length=max_length)
    return tok
