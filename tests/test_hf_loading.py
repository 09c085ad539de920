"""tsvd.hf.loading: locating sources, the lazy ``transformers`` import (no model is loaded here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tsvd.errors import UserError
from tsvd.hf.loading import check_out_dir, locate, require_transformers


def test_importing_tsvd_hf_does_not_import_transformers():
    """``transformers`` is an optional extra: only the functions that need it import it."""
    code = ("import sys, tsvd, tsvd.hf, tsvd.hf.export, tsvd.hf.finetune, tsvd.cli; "
            "print(sorted(m for m in ('transformers', 'gguf', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_require_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(UserError, match=r"needs the 'hf' extra: pip install 'tsvd\[hf\]'"):
        require_transformers()


def test_locate(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert locate(tmp_path / "hf") == (tmp_path / "hf", None)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"")
    assert locate(tmp_path / "one") == (tmp_path / "one", "m.gguf")
    assert locate(tmp_path / "one" / "m.gguf") == (tmp_path / "one", "m.gguf")
    (tmp_path / "one" / "n.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"several \.gguf files \(m\.gguf, n\.gguf\)"):
        locate(tmp_path / "one")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(UserError, match="expected a Hugging Face model directory or a .gguf file"):
        locate(tmp_path / "w.bin")
    with pytest.raises(UserError, match="no such file or directory"):
        locate(tmp_path / "missing")


def test_check_out_dir(tmp_path):
    check_out_dir(tmp_path / "new", overwrite=False)
    check_out_dir(tmp_path, overwrite=False)  # empty
    (tmp_path / "x").write_text("")
    with pytest.raises(UserError, match="exists and is not empty"):
        check_out_dir(tmp_path, overwrite=False)
    check_out_dir(tmp_path, overwrite=True)
    with pytest.raises(UserError, match="exists and is not a directory"):
        check_out_dir(tmp_path / "x", overwrite=True)
