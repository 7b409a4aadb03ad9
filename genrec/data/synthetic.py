"""Deterministic synthetic catalogue: the embedded default for the demo and tests.

Items have readable titles built from latent categories. Users walk a category Markov chain (so sequences
carry a learnable signal); tastes evolve, items launch over time (cold-start items in every period, with a
novelty boost so they do get interactions), and from ``drift_start`` on the category transition matrix changes
(co-occurrence drift for DACT to find).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from genrec.data.schema import DataError, RawData
from genrec.data.stream import Chunk, FormatVocab, Stream
from genrec.errors import ConfigError

_CATEGORY_WORDS = [
    ("Notebook", ["Spiral", "Lined", "Dotted", "Grid", "Pocket", "Hardcover"]),
    ("Pen", ["Gel", "Ballpoint", "Fountain", "Rollerball", "Fine", "Retractable"]),
    ("Stapler", ["Heavy Duty", "Mini", "Electric", "Desktop", "Long Reach", "Plier"]),
    ("Printer Paper", ["Bright White", "Recycled", "Glossy", "Cardstock", "Letter", "Legal"]),
    ("Desk Lamp", ["LED", "Dimmable", "Clamp", "Architect", "Touch", "USB"]),
    ("Backpack", ["Laptop", "Hiking", "Rolling", "Waterproof", "Canvas", "School"]),
    ("Headphones", ["Wireless", "Noise Cancelling", "Over-Ear", "Sport", "Studio", "Kids"]),
    ("Coffee Mug", ["Ceramic", "Travel", "Insulated", "Glass", "Enamel", "Novelty"]),
    ("Board Game", ["Strategy", "Party", "Cooperative", "Family", "Trivia", "Card"]),
    ("Yoga Mat", ["Non-Slip", "Thick", "Travel", "Cork", "Printed", "Eco"]),
    ("Water Bottle", ["Stainless", "Collapsible", "Filtered", "Kids", "Sports", "Glass"]),
    ("Calculator", ["Scientific", "Graphing", "Printing", "Solar", "Financial", "Basic"]),
]
_BRANDS = ["Acme", "Northwind", "Contoso", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Tyrell", "Soylent"]
_COLOURS = ["Black", "Blue", "Red", "Green", "Grey", "White", "Pink", "Teal"]


@dataclass
class SyntheticConfig:
    """Size and dynamics of the synthetic catalogue."""

    num_users: int = 600
    num_items: int = 500
    num_categories: int = 12
    interactions_per_user: float = 12.0  # mean sequence length (Poisson, at least 3)
    initial_item_fraction: float = 0.55  # items available from the start; the rest launch over time
    novelty_boost: float = 4.0  # popularity multiplier of an item during its launch window
    stay_probability: float = 0.55  # chance the next item stays in the current category
    drift_start: float = 0.6  # fraction of the time axis after which co-occurrences drift
    num_time_steps: int = 1_000_000  # timestamps are integers in [0, num_time_steps)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("num_users", 1), ("num_items", 1), ("num_categories", 1), ("num_time_steps", 2)):
            check_int(f"data.synthetic.{name}", getattr(self, name), low)
        if self.num_categories > len(_CATEGORY_WORDS):  # would be clamped silently otherwise
            raise ConfigError(
                f"data.synthetic.num_categories: expected at most {len(_CATEGORY_WORDS)} (the built-in category "
                f"names), got {self.num_categories}"
            )
        for name in ("initial_item_fraction", "stay_probability", "drift_start"):
            check_number(f"data.synthetic.{name}", getattr(self, name), 0.0, 1.0)
        check_number("data.synthetic.interactions_per_user", self.interactions_per_user, 0.0, math.inf)
        check_number("data.synthetic.novelty_boost", self.novelty_boost, 0.0, math.inf)


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")


def check_number(name: str, value, low: float, high: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not ok:  # NaN fails the comparison too
        bounds = f">= {low}" if math.isinf(high) else f"in [{low}, {high}]"
        raise ConfigError(f"{name}: expected a number {bounds}, got {value!r}")


def generate_synthetic(cfg: SyntheticConfig) -> RawData:
    """The catalogue as one frame of string ids, sorted by time (stable): small data and tests."""
    items, chunks = synthetic_chunks(cfg)
    parts = list(chunks)
    users, item_seq, times = (np.concatenate([p[k] for p in parts]) for k in range(3))
    inter = pd.DataFrame(
        {
            "user_id": np.char.add("U", np.char.zfill(users.astype(str), 7)),
            "item_id": np.char.add("S", np.char.zfill(item_seq.astype(str), 7)),
            "timestamp": np.asarray(times, dtype=np.int64),
        }
    )
    inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return RawData(inter, items, f"synthetic(seed={cfg.seed})")


def synthetic_stream(cfg: SyntheticConfig) -> Stream:
    """The catalogue as a stream of integer-id chunks in generation order (ids formatted only when needed):
    100M interactions without a Python string per row. Same interactions as ``generate_synthetic``."""
    items, chunks = synthetic_chunks(cfg)
    stream = Stream(iter(()), lambda: items, f"synthetic(seed={cfg.seed})", FormatVocab("U", 7, cfg.num_users),
                    FormatVocab("S", 7, cfg.num_items))
    stream.chunks = (Chunk(u, i, t) for u, i, t in chunks)
    return stream


def synthetic_chunks(cfg: SyntheticConfig) -> tuple[pd.DataFrame, Iterator[tuple[np.ndarray, ...]]]:
    """(items frame, generator of (user, item, timestamp) int64 chunks in generation order). The item table is
    drawn first, then the walks, from one generator: the same draws in the same order for any consumer."""
    rng = np.random.default_rng(cfg.seed)
    n_cat = min(cfg.num_categories, len(_CATEGORY_WORDS))
    T = cfg.num_time_steps
    # ---- items
    cat = rng.integers(0, n_cat, cfg.num_items)
    launched_late = rng.random(cfg.num_items) >= cfg.initial_item_fraction
    launch = np.where(launched_late, rng.integers(int(0.3 * T), T, cfg.num_items), 0)
    popularity = rng.pareto(1.5, cfg.num_items) + 0.2
    rows = []
    for i in range(cfg.num_items):
        name, adjectives = _CATEGORY_WORDS[cat[i]]
        adj = adjectives[rng.integers(len(adjectives))]
        colour = _COLOURS[rng.integers(len(_COLOURS))]
        brand = _BRANDS[rng.integers(len(_BRANDS))]
        rows.append(
            {
                "item_id": f"S{i:07d}",
                "title": f"{brand} {adj} {name}, {colour}, Model {i}",
                "brand": brand,
                "categories": f"Synthetic, {name}",
                "description": f"A {adj.lower()} {name.lower()} in {colour.lower()} by {brand}.",
            }
        )
    items = pd.DataFrame(rows)
    return items, _walks(cfg, rng, n_cat, cat, launch, popularity)


def _walks(cfg: SyntheticConfig, rng: np.random.Generator, n_cat: int, cat: np.ndarray, launch: np.ndarray,
           popularity: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    T = cfg.num_time_steps
    # ---- category dynamics: a sparse Markov chain before and after the drift point
    def chain(seed_offset: int) -> np.ndarray:
        r = np.random.default_rng(cfg.seed + seed_offset)
        m = r.random((n_cat, n_cat)) ** 4
        np.fill_diagonal(m, 0)
        m = m / m.sum(1, keepdims=True) * (1 - cfg.stay_probability)
        return m + np.eye(n_cat) * cfg.stay_probability

    before, after = chain(101), chain(202)
    # ---- items of each category sorted by launch time: "launched by t" and "launched recently" are index ranges
    by_cat = []
    for c in range(n_cat):
        members = np.flatnonzero(cat == c)
        members = members[np.argsort(launch[members], kind="stable")]
        by_cat.append((members, launch[members], np.r_[0.0, np.cumsum(popularity[members])]))
    window = 0.08 * T
    # ---- users: start time, sequence length, time gaps (vectorised over users, one step at a time)
    lengths = np.maximum(rng.poisson(cfg.interactions_per_user, cfg.num_users), 3)
    starts = rng.integers(0, int(0.9 * T), cfg.num_users)
    span = rng.integers(T // 20, T // 2, cfg.num_users)
    cur_cat = rng.integers(0, n_cat, cfg.num_users)
    t = starts.astype(np.float64)
    produced = 0
    for step in range(int(lengths.max())):
        active = step < lengths
        t = np.minimum(t + rng.random(cfg.num_users) * span / lengths, T - 1)
        if step > 0:
            draw, late = rng.random(cfg.num_users), t >= cfg.drift_start * T
            for a in range(0, cfg.num_users, 1 << 16):  # blocks of users: (users, categories) floats stay small
                b = slice(a, a + (1 << 16))
                trans = np.where(late[b, None], after[cur_cat[b]], before[cur_cat[b]])
                cur_cat[b] = np.minimum((draw[b, None] > np.cumsum(trans, 1)).sum(1), n_cat - 1)
        for c in range(n_cat):
            who = np.flatnonzero(active & (cur_cat == c))
            if len(who) == 0:
                continue
            members, mlaunch, cw = by_cat[c]
            hi = np.searchsorted(mlaunch, t[who], side="right")  # launched items: [0, hi)
            first_late = np.searchsorted(mlaunch, 0, side="right")
            lo_recent = np.maximum(np.searchsorted(mlaunch, t[who] - window, side="left"), first_late)
            has_recent = lo_recent < hi
            # novelty: with probability boost/(1+boost) pick among recent launches (weighted by popularity)
            pick_recent = has_recent & (rng.random(len(who)) < cfg.novelty_boost / (1 + cfg.novelty_boost))
            lo = np.where(pick_recent, lo_recent, 0)
            ok = hi > lo
            u = cw[lo] + rng.random(len(who)) * (cw[hi] - cw[lo])
            idx = np.clip(np.searchsorted(cw, u, side="right") - 1, lo, np.maximum(hi - 1, lo))
            produced += int(ok.sum())
            yield (who[ok].astype(np.int64), members[np.minimum(idx[ok], len(members) - 1)].astype(np.int64),
                   t[who][ok].astype(np.int64))
    if produced == 0:  # tiny catalogues whose items all launch after every user is done
        raise DataError(f"synthetic data with {cfg} has no interactions; use more users or items")
