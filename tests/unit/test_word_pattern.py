"""The letter-or-digit pattern of the request schema (``question`` and ``context``): every character
it allows is one the strictest tokenizer served here (BERT uncased) reads as a token, so a body the
document allows never fails later as text with no word for the model; and it is plain ``\\uXXXX``
ranges, read the same by Python's re (the app's validator) and ECMA-262 (clients, API testers)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from tokenizers import Tokenizer

from shared.engine.word_pattern import WORD, WORD_RANGES


def test_every_character_of_the_pattern_is_read_by_the_bert_uncased_tokenizer(tiny_bert_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_bert_dir / "tokenizer.json"))
    unread = [
        f"U+{code:04X}"
        for low, high in WORD_RANGES
        for code in range(low, high + 1)
        if not tokenizer.encode(chr(code), add_special_tokens=False).ids
    ]
    assert unread == []
    assert sum(high - low + 1 for low, high in WORD_RANGES) > 40_000  # the scripts of the BMP, not ASCII alone


def test_the_pattern_is_plain_ranges_in_order() -> None:
    assert re.fullmatch(r"\[(\\u[0-9a-f]{4}-\\u[0-9a-f]{4})+\]", WORD)
    assert all(low <= high < next_low for (low, high), (next_low, _) in itertools.pairwise(WORD_RANGES))
    pattern = re.compile(WORD)
    for text in ("Who won?", "谁赢了", "Кто выиграл", "من فاز", "42", "é"):
        assert pattern.search(text), text
    for text in ("?!", " \t", "\u0084", "\u200b\u0301", "\ue000", "🏈"):
        assert not pattern.search(text), text
