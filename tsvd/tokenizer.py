"""Tokenizers with one small interface: ``encode``, ``encode_batch``, ``decode``, ``vocab_size``,
``eot_id``, ``save(dir)``; ``load_tokenizer(dir)`` reads back either kind.

- ``ByteTokenizer``: the 256 UTF-8 bytes plus end-of-text (id 256), no dependencies.
- ``BPETokenizer``: byte-level BPE from HF ``tokenizers`` (GPT-2 style pre-tokenization, no
  normalization), trained locally or loaded from a ``tokenizer.json``.

Both are lossless: ``decode(encode(text)) == text`` for any string. End-of-text is produced only by
the data pipeline (``eot_id``), never by ``encode``: the literal ``<|endoftext|>`` in a text is
encoded as ordinary characters; ``decode`` renders ``eot_id`` as ``<|endoftext|>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

from tsvd.errors import UserError

EOT = "<|endoftext|>"
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>")  # recognised in loaded tokenizer.json files
BPE_FILE = "tokenizer.json"
BYTE_FILE = "byte_tokenizer.json"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes ``0..255`` and end-of-text ``256`` (``vocab_size = 257``)."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; invalid UTF-8 (e.g. a sampled partial character) becomes U+FFFD."""
        out, run = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                out.append(run.decode("utf-8", errors="replace") + EOT)
                run = bytearray()
            else:
                run.append(i)
        return "".join(out) + run.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / BYTE_FILE).write_text(json.dumps({"kind": "byte", "vocab_size": 257, "eot_id": 256}))


class BPETokenizer:
    """Byte-level BPE (HF ``tokenizers``). Build with ``train`` or ``from_file``."""

    kind = "bpe"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.tok.encode_special_tokens = True  # "<|endoftext|>" inside a text is just text
        eot = next((name for name in EOT_NAMES if tok.token_to_id(name) is not None), None)
        if eot is None:
            raise UserError(f"tokenizer has no end-of-text token (looked for {', '.join(EOT_NAMES)})")
        self.eot_id: int = tok.token_to_id(eot)
        self.vocab_size: int = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, progress: bool = False,
              length: int | None = None) -> "BPETokenizer":
        """Train a byte-level BPE with ``vocab_size`` entries (256 bytes + merges + end-of-text)."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer, length=length)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        """Load a ``tokenizer.json`` (any HF tokenizer with an end-of-text token)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exception on malformed JSON
            if isinstance(e, UserError):
                raise UserError(f"{path}: {e}") from None
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes in parallel (Rust threads)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(directory) / BPE_FILE))


def load_tokenizer(directory: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer saved in ``directory`` by ``save``."""
    directory = Path(directory)
    if (directory / BPE_FILE).is_file():
        return BPETokenizer.from_file(directory / BPE_FILE)
    if (directory / BYTE_FILE).is_file():
        return ByteTokenizer()
    raise UserError(f"no tokenizer in {directory} (expected {BPE_FILE} or {BYTE_FILE})")
