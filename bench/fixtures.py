"""Benchmark fixtures: a bert-large-shaped QA model with random fp32 weights, built locally.

24 layers, hidden 1024, 16 heads, intermediate 4096, vocab 30522: the shape (and the 1.34 GB
``model.safetensors``) of ``bert-large-uncased-whole-word-masking-finetuned-squad``, with a real
uncased WordPiece tokenizer over a synthetic vocabulary. Built once under ``bench/out/``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
VOCAB_SIZE = 30522


def bert_large_vocab() -> list[str]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures.tiny_models import WORDS

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += WORDS
    syllables = [a + b for a in "bcdfghklmnprstvw" for b in "aeiou"]
    i = 0
    while len(dict.fromkeys(vocab)) < VOCAB_SIZE:
        a, b, c = syllables[i % 80], syllables[(i // 80) % 80], syllables[(i // 6400) % 80]
        vocab.append(a + b + (c if i >= 6400 else ""))
        vocab.append("##" + b + a)
        i += 1
    return list(dict.fromkeys(vocab))[:VOCAB_SIZE]


def bert_large(dest: Path | None = None) -> Path:
    """The bert-large-shaped model folder (built on first use)."""
    dest = dest or OUT / "bert-large-random"
    if (dest / "model.safetensors").exists() and (dest / "tokenizer.json").exists():
        return dest
    import torch
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertConfig, BertForQuestionAnswering

    dest.mkdir(parents=True, exist_ok=True)
    vocab = bert_large_vocab()
    (dest / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True).save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}), encoding="utf-8"
    )
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    BertForQuestionAnswering(config).eval().save_pretrained(str(dest), safe_serialization=True)
    return dest


if __name__ == "__main__":
    folder = bert_large()
    for path in sorted(folder.iterdir()):
        print(f"{path.stat().st_size:>14,}  {path.name}")
