"""Item text from a template over catalogue fields."""

from __future__ import annotations

import re
import string

from genrec.data.schema import ITEM_TEXT_FIELDS, DataError, ItemCatalog
from genrec.errors import ConfigError

DEFAULT_TEMPLATE = "{title}. Brand: {brand}. Categories: {categories}. {description}"
_SEGMENT = re.compile(r"[^{}]*\{[a-z_]+\}[^{}]*?(?=\{|$)|[^{}]+$")


def template_fields(template: str) -> list[str]:
    """Field names of a template of plain ``{name}`` fields (no format spec, conversion or positional ``{}``)."""
    where = f"data.text_template: {template!r}"
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # unbalanced braces
        raise ConfigError(f"{where}: not a valid template ({exc})") from None
    for name, spec, conv in parsed:
        if not name.isidentifier() or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{where}: expected plain fields like '{{title}}', got '{shown}'")
    if not parsed:
        raise ConfigError(f"{where}: names no field (use e.g. '{{title}}')")
    return [name for name, _, _ in parsed]


def check_template_fields(catalog: ItemCatalog, template: str) -> None:
    """A field no item can have is a typo (its segment would vanish from every text); one some items lack is fine."""
    known = list(dict.fromkeys([*ITEM_TEXT_FIELDS, *catalog.fields]))
    unknown = [f for f in dict.fromkeys(template_fields(template)) if f not in known]
    if unknown:
        raise DataError(
            f"data.text_template {template!r}: unknown item field(s) {unknown}; available fields: {known}"
        )


def _segments(template: str) -> list[tuple[str, list[str]]]:
    """Split the template into segments of literal text around one field each."""
    fields = template_fields(template)
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
    check_template_fields(catalog, template)
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
