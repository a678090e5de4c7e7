"""Loading the MiniCPM-V 2.6 tokenizer from a checkpoint directory, without remote code.

The original repository ships a Qwen2 byte-level BPE tokenizer (``tokenizer.json``, or ``vocab.json`` +
``merges.txt`` + ``added_tokens.json``) and a ``tokenizer_config.json`` whose ``auto_map`` names a remote
class (``MiniCPMVTokenizerFast``). That class only adds ``*_id`` properties; it changes no tokenization.
We therefore build a plain :class:`transformers.PreTrainedTokenizerFast` from the data files, ignore
``auto_map``, expose the ids the engine needs through :class:`SpecialTokenIds`, and check that the special
tokens sit at their real ids.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PLACEHOLDER = "<unk>"

# The 23 tokens added after Qwen2's BPE vocabulary, in id order from 151643, then the image placeholder,
# which the original registers at 128244, inside the BPE range (MODEL_FACTS §6.2).
_ADDED_TOKENS_IN_ORDER = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<image>",
    "</image>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<point>",
    "</point>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
    *(f"<|reserved_special_token_{i}|>" for i in range(6)),
)
SPECIAL_TOKENS: dict[str, int] = {
    **{token: 151643 + offset for offset, token in enumerate(_ADDED_TOKENS_IN_ORDER)},
    IMAGE_PLACEHOLDER: 128244,
}

# Id 0 is the ordinary token "!" in the Qwen2 vocabulary; the original code pads with it (MODEL_FACTS §9.7).
PAD_TOKEN_ID = 0
DEFAULT_STOP_TOKEN_IDS: tuple[int, ...] = (SPECIAL_TOKENS[IM_END], SPECIAL_TOKENS[ENDOFTEXT])

# Qwen2's pre-tokenisation: this regex split, then byte-level mapping without GPT-2's own regex.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Used only when a checkpoint carries no template of its own. ChatML, with Qwen2-Instruct's default system
# turn when the conversation does not start with a system message. Message contents are plain strings by then.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if loop.first and message['role'] != 'system' -%}\n"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

# Used when tokenizer_config.json does not name them; the MiniCPM family's values for its Qwen2 tokenizers.
_DEFAULT_TOKEN_STRINGS = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": IMAGE_PLACEHOLDER}
_TOKEN_STRING_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class SpecialTokenIds:
    """The token ids the engine needs: chat markers, image markup, the image placeholder, newline and pad."""

    im_start: int
    im_end: int
    endoftext: int
    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    image_id_start: int
    image_id_end: int
    unk: int
    newline: int
    pad: int = PAD_TOKEN_ID

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast) -> SpecialTokenIds:
        """Look the ids up in ``tokenizer``.

        Raises:
            ValueError: a token is missing from the vocabulary, or "\\n" is not a single token.
        """
        backend = tokenizer.backend_tokenizer

        def lookup(token: str) -> int:
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no token {token!r}")
            return token_id

        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise ValueError(f'"\\n" must be a single token, but the tokenizer encodes it as {newline}')
        return cls(
            im_start=lookup(IM_START),
            im_end=lookup(IM_END),
            endoftext=lookup(ENDOFTEXT),
            image_start=lookup("<image>"),
            image_end=lookup("</image>"),
            slice_start=lookup("<slice>"),
            slice_end=lookup("</slice>"),
            image_id_start=lookup("<image_id>"),
            image_id_end=lookup("</image_id>"),
            unk=lookup(IMAGE_PLACEHOLDER),
            newline=newline[0],
            pad=PAD_TOKEN_ID,
        )


def apply_qwen2_pipeline(backend: Tokenizer) -> None:
    """Give a byte-level BPE ``backend`` Qwen2's normaliser, pre-tokeniser, post-processor and decoder."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load the MiniCPM-V 2.6 tokenizer of the checkpoint directory ``path``.

    Reads ``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt`` (+ ``added_tokens.json``),
    and from ``tokenizer_config.json`` (optional) the chat template, the bos/eos/pad/unk strings,
    ``model_max_length`` and ``added_tokens_decoder``; ``auto_map`` / ``tokenizer_class`` are ignored and no
    checkpoint code ever runs. A ``chat_template.jinja`` file overrides the config's template; without
    either, ``DEFAULT_CHAT_TEMPLATE`` is used.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or it holds neither ``tokenizer.json`` nor
            ``vocab.json`` + ``merges.txt``.
        ValueError: a file is malformed, or a token of ``SPECIAL_TOKENS`` does not encode to its real id
            and decode back, i.e. the directory does not hold a MiniCPM-V 2.6 tokenizer.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {str(directory)!r} does not exist or is not a directory"
        )
    config_file = directory / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    if not config_file.is_file():
        logger.warning("%s has no tokenizer_config.json; using MiniCPM-V 2.6 defaults", directory)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    added_tokens = _added_tokens_from_config(config)

    tokenizer_file = directory / "tokenizer.json"
    init_kwargs: dict[str, Any] = {}
    if tokenizer_file.is_file():
        init_kwargs["tokenizer_file"] = str(tokenizer_file)
    else:
        init_kwargs["tokenizer_object"] = _backend_from_vocab_and_merges(directory, added_tokens)

    for key in _TOKEN_STRING_KEYS:
        value = _token_string(config.get(key, _DEFAULT_TOKEN_STRINGS.get(key)), key)
        if value is not None:
            init_kwargs[key] = value
    if "model_max_length" in config:
        init_kwargs["model_max_length"] = int(config["model_max_length"])
    if added_tokens:
        init_kwargs["added_tokens_decoder"] = added_tokens
    init_kwargs["clean_up_tokenization_spaces"] = bool(config.get("clean_up_tokenization_spaces", False))
    init_kwargs["chat_template"] = _chat_template(directory, config)

    # name_or_path is deliberately not passed: with it, transformers 5.x may query the Hub (its Mistral
    # regex check on vocabularies over 100k).
    tokenizer = PreTrainedTokenizerFast(**init_kwargs)
    tokenizer.name_or_path = str(directory)
    _verify_special_tokens(tokenizer, directory)
    return tokenizer


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error


def _token_string(value: Any, key: str) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, null, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"tokenizer_config.json: {key} must be a string, null or an object with 'content', got {value!r}"
    )


def _added_tokens_from_config(config: dict[str, Any]) -> dict[int, AddedToken]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ValueError(
            "tokenizer_config.json: added_tokens_decoder must be an object mapping ids to tokens"
        )
    added: dict[int, AddedToken] = {}
    for raw_id, entry in decoder.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ValueError(
                f"tokenizer_config.json: added_tokens_decoder[{raw_id!r}] has no string 'content'"
            )
        added[int(raw_id)] = AddedToken(
            entry["content"],
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", False)),
            special=bool(entry.get("special", True)),
        )
    return added


def _chat_template(directory: Path, config: dict[str, Any]) -> str:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        logger.info("%s carries no chat template; using the default ChatML template", directory)
        return DEFAULT_CHAT_TEMPLATE
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(
            f"tokenizer_config.json: chat_template lists {sorted(map(str, named))} but no 'default'"
        )
    raise ValueError(
        f"tokenizer_config.json: chat_template must be a string or a list, got {type(template).__name__}"
    )


def _backend_from_vocab_and_merges(directory: Path, config_added: dict[int, AddedToken]) -> Tokenizer:
    """Rebuild the backend from the slow-tokenizer files, placing every added token at its stated id.

    The tokenizers library renumbers an added token that is not in the model's vocabulary, so each added token
    missing from vocab.json is inserted there at its id (when that id is free) before it is registered.
    """
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    missing = [file.name for file in (vocab_file, merges_file) if not file.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} holds no tokenizer.json and lacks {' and '.join(missing)}; "
            "a tokenizer needs tokenizer.json or vocab.json + merges.txt"
        )
    vocab = _read_json(vocab_file)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_file} must map tokens to ids")
    merges = []
    for line in merges_file.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_file}: malformed merge line {line!r}")
        merges.append((parts[0], parts[1]))

    added = dict(config_added)
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        for content, token_id in _read_json(added_file).items():
            added.setdefault(int(token_id), AddedToken(content, normalized=False, special=True))

    used_ids = set(vocab.values())
    for token_id, token in sorted(added.items()):
        if token.content not in vocab and token_id not in used_ids:
            vocab[token.content] = token_id
            used_ids.add(token_id)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    apply_qwen2_pipeline(backend)
    ordered = [token for _, token in sorted(added.items())]
    backend.add_special_tokens([token for token in ordered if token.special])
    backend.add_tokens([token for token in ordered if not token.special])
    return backend


def _verify_special_tokens(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    for token, expected_id in SPECIAL_TOKENS.items():
        ids = tokenizer.encode(token, add_special_tokens=False)
        decoded = tokenizer.decode([expected_id], skip_special_tokens=False)
        if ids != [expected_id] or decoded != token:
            raise ValueError(
                f"{directory} does not hold a MiniCPM-V 2.6 tokenizer: {token!r} encodes to {ids} and id "
                f"{expected_id} decodes to {decoded!r}, expected [{expected_id}] and {token!r}"
            )


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (Qwen2's too), as a map from each of its 256 characters to its byte: the
    printable bytes stand for themselves, the other 68 are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


class TokenPieces:
    """What a logprob entry says about a token id alone: its raw bytes and OpenAI's ``token`` string.

    A byte-level BPE token may hold part of a UTF-8 character (Qwen2 splits most CJK characters and emoji over
    two or three tokens), so decoding it alone gives U+FFFD. Its bytes come from the vocabulary entry instead,
    through the byte-level alphabet; the string is those bytes as UTF-8 when they are valid, and otherwise
    what OpenAI returns for such tokens: ``"bytes:"`` followed by the bytes, printable ASCII as is and every
    other byte as ``\\xNN`` (e.g. ``"bytes:\\xe4\\xbd"``). Special tokens (``<|im_end|>``, ``<image>``, ...),
    which decoding leaves out of the text, have their name as the string and no bytes (None, OpenAI's
    "no bytes representation"). So the bytes of a completion's tokens concatenate to the UTF-8 of its text.
    Other added tokens (not byte-level encoded) have the UTF-8 of their content.

    Args:
        tokenizer: a Hugging Face tokenizer (``convert_ids_to_tokens``, ``added_tokens_decoder``, ``decode``).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._added = {int(i): token for i, token in tokenizer.added_tokens_decoder.items()}
        self._cache: dict[int, tuple[str, bytes | None]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes | None]:
        """``(token string, raw bytes or None)`` of ``token_id``."""
        piece = self._cache.get(token_id)
        if piece is None:
            piece = self._cache[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> tuple[str, bytes | None]:
        added = self._added.get(token_id)
        if added is not None:
            return (added.content, None) if added.special else (added.content, added.content.encode("utf-8"))
        entry = self._tokenizer.convert_ids_to_tokens(token_id)
        if entry is not None and all(char in _BYTE_LEVEL for char in entry):
            raw = bytes(_BYTE_LEVEL[char] for char in entry)
        else:  # not a byte-level entry (another kind of tokenizer): what decoding it alone gives
            raw = self._tokenizer.decode([token_id]).encode("utf-8")
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw), raw
