"""The prompt-file loader: real files in tmp_path, every error message checked for file and line."""

import pytest

from orchestrator.prompts import load_prompt_file
from rewards.world import Prompt


def write(tmp_path, content: bytes, name="prompts.txt"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_reads_prompts_skipping_blanks_and_comments(tmp_path):
    path = write(tmp_path, b"# training prompts\n  a red circle moving left slowly  \n\n\t\n"
                           b"   # indented comment\r\na blue square moving up quickly\r\n"
                           b"a red circle moving left slowly\nno newline at end")
    assert load_prompt_file(path) == ["a red circle moving left slowly", "a blue square moving up quickly",
                                      "a red circle moving left slowly", "no newline at end"]


def test_accepts_utf8_with_bom_and_non_ascii(tmp_path):
    path = write(tmp_path, "\ufeffun café rouge\n".encode("utf-8") + "日本語のプロンプト\n".encode("utf-8"))
    assert load_prompt_file(path) == ["un café rouge", "日本語のプロンプト"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.txt: prompt file not found"):
        load_prompt_file(tmp_path / "nothere.txt")


def test_directory(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory, not a prompt file") as e:
        load_prompt_file(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n\n   \n", b"# only\n#comments\n"])
def test_no_prompts(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as e:
        load_prompt_file(path)
    assert str(e.value) == f"{path}: no prompts (the file is empty or holds only blank lines and # comments)"


def test_not_utf8_names_line_and_byte_offset(tmp_path):
    path = write(tmp_path, b"ok one\nok two\nbad \xe9 latin-1\n")  # 0xe9 is at byte offset 18
    with pytest.raises(ValueError) as e:
        load_prompt_file(path)
    assert str(e.value) == f"{path}:3: not UTF-8 (byte 0xe9 at byte offset 18)"


def test_utf16_file_is_reported_not_misread(tmp_path):
    path = write(tmp_path, "a red circle moving left slowly\n".encode("utf-16"))  # starts with BOM ff fe
    with pytest.raises(ValueError, match=r":1: not UTF-8 \(byte 0xff at byte offset 0\)"):
        load_prompt_file(path)


def test_line_over_max_chars(tmp_path):
    path = write(tmp_path, b"short\n" + b"x" * 21 + b"\n" + b"y" * 20 + b"\n")
    with pytest.raises(ValueError) as e:
        load_prompt_file(path, max_chars=20)
    assert str(e.value) == f"{path}:2: prompt is 21 characters, over the limit of 20"
    # exactly at the limit, with surrounding whitespace that does not count, is fine
    ok = write(tmp_path, b"  " + b"y" * 20 + b"  \n", name="ok.txt")
    assert load_prompt_file(ok, max_chars=20) == ["y" * 20]


def test_nul_byte(tmp_path):
    path = write(tmp_path, b"fine\n# comment\nab\x00cd\n")
    with pytest.raises(ValueError) as e:
        load_prompt_file(path)
    assert str(e.value) == f"{path}:3: NUL byte at column 3 (binary or UTF-16 file?)"


def test_validate_error_names_file_and_line(tmp_path):
    path = write(tmp_path, b"a red circle moving left slowly\n\n# next is wrong\na purple circle moving left slowly\n")
    with pytest.raises(ValueError) as e:
        load_prompt_file(path, validate=Prompt.parse)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: prompt 'a purple circle moving left slowly': unknown colour 'purple'")
    assert "\n" not in msg


def test_validate_multiline_message_becomes_one_line(tmp_path):
    path = write(tmp_path, b"one\ntwo\n")

    def reject_two(text):
        if text == "two":
            raise ValueError("first problem\n  second problem\n")

    with pytest.raises(ValueError) as e:
        load_prompt_file(path, validate=reject_two)
    assert str(e.value) == f"{path}:2: first problem; second problem"


def test_validate_accepts_good_file(tmp_path):
    path = write(tmp_path, b"a red circle moving left slowly\nA BLUE square moving up quickly\n")
    assert load_prompt_file(path, validate=Prompt.parse) == ["a red circle moving left slowly",
                                                             "A BLUE square moving up quickly"]


def test_bad_max_chars(tmp_path):
    with pytest.raises(ValueError, match="max_chars must be an int >= 1, got 0"):
        load_prompt_file(write(tmp_path, b"x\n"), max_chars=0)
