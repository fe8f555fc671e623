"""Tokenizer files for the embedded models: a small CLIP BPE vocabulary written in code.

CLIP's tokenizer maps text to bytes, bytes to printable characters, then merges characters with BPE.
We keep CLIP's byte alphabet (so any text tokenizes) and add whole-word merges for a short word list,
so common prompt words become single tokens. The files are the standard ``vocab.json`` / ``merges.txt``
pair that ``transformers.CLIPTokenizer`` reads, exactly as a real checkpoint ships them.
"""

from __future__ import annotations

import json
from pathlib import Path

START, END = "<|startoftext|>", "<|endoftext|>"

# Words of the prompts the demo and tests use; anything else falls back to characters.
DEFAULT_WORDS = (
    "a an the of in on with and photo picture painting drawing small large big tiny "
    "red green blue yellow orange purple white black gray pink brown cyan magenta "
    "circle square triangle star cross ring shape dog cat house tree car flower "
    "left right top bottom center middle background"
).split()


def _byte_alphabet() -> list[str]:
    """CLIP's reversible byte -> printable-character table (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_vocab(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges). Each word gets the left-to-right merges that build it as one token."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab[token] = len(vocab)
    merges: list[str] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
            joined = symbols[0] + symbols[1]
            vocab.setdefault(joined, len(vocab))
            symbols = [joined, *symbols[2:]]
    vocab[START] = len(vocab)
    vocab[END] = len(vocab)
    return vocab, merges


def write_tokenizer(folder: Path, max_length: int = 77, words=DEFAULT_WORDS) -> int:
    """Write a CLIPTokenizer folder; return the vocabulary size (the text encoder's ``vocab_size``)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    raw = folder / "_raw"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    # Keep the classic file pair too: older transformers releases read only these.
    for name in ("vocab.json", "merges.txt"):
        (raw / name).replace(folder / name)
    raw.rmdir()
    return len(vocab)
