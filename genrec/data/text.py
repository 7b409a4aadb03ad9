"""Item text from a template over catalogue fields."""

from __future__ import annotations

import re
import string

from genrec.data.schema import DataError, ItemCatalog

DEFAULT_TEMPLATE = "{title}. Brand: {brand}. Categories: {categories}. {description}"
_SEGMENT = re.compile(r"[^{}]*\{[a-z_]+\}[^{}]*?(?=\{|$)|[^{}]+$")


def _segments(template: str) -> list[tuple[str, list[str]]]:
    """Split the template into segments of literal text around one field each."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if not fields:
        raise DataError(f"text template {template!r} names no field (use e.g. '{{title}}')")
    parts = []
    rest = template
    for i, name in enumerate(fields):
        token = "{" + name + "}"
        head, rest = rest.split(token, 1)
        if i == len(fields) - 1:
            parts.append((head + token + rest, [name]))
        else:
            # the literal text after a field belongs to it up to the next sentence-ish separator
            nxt = "{" + fields[i + 1] + "}"
            between = rest.split(nxt, 1)[0]
            cut = max(between.rfind(". "), between.rfind("; "), between.rfind(", "))
            own = between[: cut + 1] if cut >= 0 else ""
            parts.append((head + token + own, [name]))
            rest = rest[len(own):]
    return parts


def item_texts(catalog: ItemCatalog, template: str = DEFAULT_TEMPLATE) -> tuple[list[str], int]:
    """One text per item; segments whose field is missing are dropped; an item with no text at all falls back
    to its id. Returns (texts, number of items that fell back)."""
    segs = _segments(template)
    for _, names in segs:
        for name in names:
            if name not in catalog.fields:
                catalog.fields[name] = [None] * len(catalog)
    texts, fallbacks = [], 0
    for i, item_id in enumerate(catalog.item_ids):
        pieces = []
        for fmt, names in segs:
            values = {n: catalog.fields[n][i] for n in names}
            if all(v is not None and str(v).strip() for v in values.values()):
                pieces.append(fmt.format(**values).strip())
        text = " ".join(pieces).strip()
        if not text:
            text = str(item_id)
            fallbacks += 1
        texts.append(text)
    return texts, fallbacks
