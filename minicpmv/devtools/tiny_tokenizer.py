"""Write a tiny stand-in for the MiniCPM-V 2.6 tokenizer, in the original repository's file layout.

The real tokenizer files cannot be downloaded here, so tests and tiny checkpoints use this one: a byte-level
BPE with Qwen2's pre-tokenisation, trained deterministically on a small built-in corpus, plus every special
token of :data:`minicpmv.tokenizer.SPECIAL_TOKENS` at its real id. The vocabulary is therefore sparse:
ordinary ids 0..N-1 (N <= vocab_size; the first 256 are the byte alphabet in GPT-2 order, as in Qwen2, so
"!" = 0, the digits are 15..24 and "\\n" = 198), then 128244 (``<unk>``) and 151643..151665.

Usage: ``python -m minicpmv.devtools.tiny_tokenizer OUT_DIR [--vocab-size N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from minicpmv.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PLACEHOLDER,
    SPECIAL_TOKENS,
    apply_qwen2_pipeline,
)

logger = logging.getLogger(__name__)

_BYTE_ALPHABET_SIZE = 256
# Ordinary ids must stay well below the lowest special id (the placeholder at 128244).
_MAX_VOCAB_SIZE = 100_000

# Qwen2-Instruct's ChatML template, as the checkpoint's own (differs in form, not in output, from
# minicpmv.tokenizer.DEFAULT_CHAT_TEMPLATE, so tests can tell which one was loaded).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
Invoice No. INV-2024-00731
Date: 2024-03-15    Due date: 2024-04-14
Bill to: Acme Corporation, 1200 Market Street, Suite 400, San Francisco, CA 94103
Ship to: Northwind Traders Ltd., 27 Harbour Road, Leeds LS1 4AP, United Kingdom

| Item | Description                  | Qty | Unit price | Amount   |
|------|------------------------------|-----|------------|----------|
| 1    | Document scanner, A4 duplex  | 2   | $349.00    | $698.00  |
| 2    | Thermal paper rolls (box/50) | 10  | $18.75     | $187.50  |
| 3    | Annual support contract      | 1   | $1,200.00  | $1,200.00|
Subtotal: $2,085.50   Tax (8.5%): $177.27   Total due: $2,262.77

Please pay within 30 days. Late payments are subject to a 1.5% monthly fee.
Questions? Contact billing@example.com or call +1 (415) 555-0198.

What is in the image? The image shows a scanned receipt on a wooden table. The receipt lists three items,
a subtotal, the tax and the total. The text at the top reads "Corner Cafe", and the date is 12/07/2023.
Describe the chart. The bar chart compares quarterly revenue for 2021, 2022 and 2023: Q1 rose from
4.2 million to 5.8 million, while Q4 fell slightly. The legend is in the upper right corner.
Read the table and answer: which region had the highest growth? The table has 4 rows and 5 columns.
Answer: the North region grew by 17%, ahead of the South (12%), the East (9%) and the West (3%).

{"invoice_id": "INV-2024-00731", "currency": "USD", "total": 2262.77, "paid": false,
 "items": [{"sku": "DS-A4-01", "qty": 2, "price": 349.0}, {"sku": "TP-50", "qty": 10, "price": 18.75}],
 "customer": {"name": "Acme Corporation", "country": "US", "tags": ["priority", "net-30"]}}
[{"page": 1, "bbox": [12, 40, 588, 96], "text": "Quarterly Report"}, {"page": 2, "bbox": null}]

Meeting notes - Monday, January 8, 2024, 09:30-10:15 (UTC+1)
1. Review of the Q4 figures; 2. Budget for 2024; 3. Any other business.
It's done, we've checked it, they're sure and I'll send it; you'd agree it's fine, wouldn't you?
Dear Ms. Lee, thank you for your letter of 21 February. We're pleased to confirm your order #58213.
The form has fields for name, address, phone, e-mail, signature and date. Tick the box [x] to agree.
Page 3 of 12 -- Section 4.2: Terms & Conditions; see also Appendix B (pp. 45-47) and Figure 7.

Café au lait, crème brûlée, naïve façade, jalapeño, São Paulo, Zürich, Kraków, Ærøskøbing, déjà vu.
La facture n° 2024-118 est payée. Die Rechnung über 450,00 € wurde am 03.05.2024 überwiesen.
El número de cliente es 7781; la fecha de entrega será el lunes. Ça coûte 12,50 € à l'unité.

发票号码：2024031500731，开票日期：2024年3月15日，金额合计：人民币贰仟贰佰陆拾贰元柒角柒分。
这张图片显示了一张表格，表格中有四行五列。请描述图片中的内容。文档的标题是"季度报告"。
图表显示2023年的收入比2022年增长了百分之十七。

Thanks for the report! 👍 The results look great 🎉 and the deadline is met ✅.
Temperature: 21.5°C; humidity: 45%; pressure: 1013 hPa; wind: 12 km/h NE.
Totals ≈ 3 × 7 = 21; ratio 1:4; range 10–20; price ~ $5; email: a.b@c.io; path: /usr/local/bin; x >= y <= z.
"""


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 1000) -> None:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json and
    added_tokens.json into ``out_dir`` (created if needed; existing files are overwritten).

    ``vocab_size`` caps the ordinary vocabulary including the 256-symbol byte alphabet; training may stop
    earlier when the corpus has no more pairs to merge. The output is byte-identical on every run.

    Raises:
        ValueError: ``vocab_size`` is not in [256, 100000].
    """
    if not _BYTE_ALPHABET_SIZE <= vocab_size <= _MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be in [{_BYTE_ALPHABET_SIZE}, {_MAX_VOCAB_SIZE}], got {vocab_size}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    trained = json.loads(_train(vocab_size).to_str())
    model = trained["model"]
    ordinary_vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]

    # The tokenizers library renumbers added tokens that are absent from model.vocab, so each special token
    # goes into the vocabulary at its real id AND into added_tokens with that id.
    specials = sorted(SPECIAL_TOKENS.items(), key=lambda item: item[1])
    model["vocab"] = {**ordinary_vocab, **dict(specials)}
    model["merges"] = [merge.split(" ") for merge in merges]
    trained["added_tokens"] = [_added_token_entry(token, token_id) for token, token_id in specials]

    # As in the original (its added_tokens.json has 629 bytes, i.e. exactly the 23 tokens from 151643),
    # the placeholder is part of vocab.json.
    added_after_bpe = {token: token_id for token, token_id in specials if token != IMAGE_PLACEHOLDER}
    vocab_json = {**ordinary_vocab, IMAGE_PLACEHOLDER: SPECIAL_TOKENS[IMAGE_PLACEHOLDER]}

    _write_json(out_dir / "tokenizer.json", trained)
    _write_json(out_dir / "vocab.json", vocab_json, indent=None)
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8"
    )
    _write_json(out_dir / "added_tokens.json", added_after_bpe, sort_keys=True)
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(specials))
    logger.info("wrote a tiny tokenizer with %d ordinary tokens to %s", len(ordinary_vocab), out_dir)


def _train(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    apply_qwen2_pipeline(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        # All 256 byte symbols, so any text encodes; the trainer sorts them by code point, which is
        # GPT-2's (and Qwen2's) byte order.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    return tokenizer


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
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_tokenizer(args.out_dir, args.vocab_size)


if __name__ == "__main__":
    main()
