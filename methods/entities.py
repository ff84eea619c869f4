"""A deterministic entity extractor (no model): the character spans of names, dates,
numbers, emails and addresses in a text, for ascent on entity tokens only."""

from __future__ import annotations

import re

_NOT_NAMES = {
    "The",
    "A",
    "An",
    "It",
    "He",
    "She",
    "His",
    "Her",
    "They",
    "Their",
    "In",
    "On",
    "At",
    "Of",
    "What",
    "Who",
    "Which",
    "Where",
    "When",
    "Every",
    "One",
    "And",
    "But",
    "As",
    "This",
    "That",
}
_PATTERNS = [
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),  # email
    re.compile(
        r"\b(?:January|February|March|April|May|June|July|August|September|October|November|December)"
        r"\s+\d{1,2},?\s+\d{4}\b"
    ),  # long date
    re.compile(r"\b\d[\d\-/.,#]*\d\b|\b\d\b"),  # numbers, ISO dates, phone, SSN, zip
    re.compile(r"\b[A-Z][a-zA-Z'\-]+(?:\s+[A-Z][a-zA-Z'\-]+)*"),  # capitalised names and places
]


def entity_spans(text: str) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (start, end) character spans of entities in text."""
    spans = []
    for pattern in _PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span()
            if pattern is _PATTERNS[-1]:
                words = match.group().split()
                while words and words[0] in _NOT_NAMES:  # sentence-initial function words
                    start += len(words.pop(0)) + 1
                if not words:
                    continue
            spans.append((start, end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def entity_token_labels(tokenizer, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """The text's token ids, and labels that keep the ids of tokens overlapping an entity
    (-100 elsewhere): a loss on these labels is a loss on the entities alone."""
    tokens = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    spans = entity_spans(text)
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else -100
        for token, (start, end) in zip(tokens["input_ids"], tokens["offset_mapping"], strict=True)
    ]
    return tokens["input_ids"], labels
