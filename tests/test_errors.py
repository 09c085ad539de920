"""read_document: a JSON or YAML file, or a one-line UserError naming the file."""

from __future__ import annotations

import pytest

from tsvd.errors import UserError, read_document


def test_reads_json_and_yaml(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}')
    (tmp_path / "a.yaml").write_text("x: [1, 2]\n")
    assert read_document(tmp_path / "a.json", "JSON", "missing") == {"x": [1, 2]}
    assert read_document(tmp_path / "a.yaml", "YAML", "missing") == {"x": [1, 2]}


def test_missing_and_broken_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"^the thing is missing$"):
        read_document(tmp_path / "nope.json", "JSON", "the thing is missing")
    (tmp_path / "b.json").write_text("{oops")
    (tmp_path / "b.yaml").write_text("x: [unclosed\n")
    for name, kind in (("b.json", "JSON"), ("b.yaml", "YAML")):
        with pytest.raises(UserError) as info:
            read_document(tmp_path / name, kind, "missing")
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: not valid {kind} (") and "\n" not in message
