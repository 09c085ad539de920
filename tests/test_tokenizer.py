"""Tokenizers: lossless round trips (unicode, control characters, the literal end-of-text string),
end-of-text handling, save/load."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsvd import UserError
from tsvd.tokenizer import EOT, BPETokenizer, ByteTokenizer, load_tokenizer

SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  \n\n",
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🎉🧪, math ∑∫√",
    "def f(x):\n\treturn x ** 2  # tab-indented\r\n",
    "\x00\x01\x7f control bytes",
    f"a literal {EOT} inside a text",
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    corpus = SAMPLES * 20 + ["the quick brown fox jumps over the lazy dog\n" * 20, "import os\nimport sys\n" * 20]
    return BPETokenizer.train(corpus, vocab_size=320)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(bpe, text):
    for tok in (ByteTokenizer(), bpe):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids  # end-of-text only ever comes from the data pipeline
        assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_any_unicode(bpe, text):
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    assert bpe.decode(bpe.encode(text)) == text


def test_vocab_and_eot(bpe):
    byte = ByteTokenizer()
    assert (byte.vocab_size, byte.eot_id) == (257, 256)
    assert bpe.vocab_size == 320 and 0 <= bpe.eot_id < 320
    assert len(bpe.encode("the quick brown fox")) < len(byte.encode("the quick brown fox"))  # merges learned
    for tok in (byte, bpe):
        assert tok.decode(tok.encode("ab") + [tok.eot_id] + tok.encode("cd")) == f"ab{EOT}cd"
        assert tok.encode_batch(["x y", "z"]) == [tok.encode("x y"), tok.encode("z")]


def test_save_and_load(bpe, tmp_path):
    for tok in (ByteTokenizer(), bpe):
        tok.save(tmp_path / tok.kind)
        back = load_tokenizer(tmp_path / tok.kind)
        assert (back.kind, back.vocab_size, back.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
        assert back.encode(SAMPLES[3]) == tok.encode(SAMPLES[3])


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        BPETokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        BPETokenizer.from_file(tmp_path / "missing.json")
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "no_eot.json"))
    with pytest.raises(UserError, match="no end-of-text token"):
        BPETokenizer.from_file(tmp_path / "no_eot.json")
