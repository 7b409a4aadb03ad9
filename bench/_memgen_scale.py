"""MemGen analysis at scale (specs/memgen.md §10.1–10.2): relations from 10M training transitions, labels of
1M test instances over a 100k-item catalogue, on synthetic data with hubs.

    OMP_NUM_THREADS=2 .venv/bin/python bench/_memgen_scale.py [--num_items 100000] [--num_train 10000000] \
        [--num_test 1000000] [--history 20] [--seed 0] [--zipf 0.8] [--p_jump 0.9] [--max_step 64] \
        [--predictions K] [--tokens] [--out results.json]

Synthetic users (one per test instance) walk the catalogue: the first item and every "jump" (90% of the
steps by default) are drawn from a Zipf(0.8) popularity law, the other steps move up to 64 places along a
fixed random ring of items (sequential locality). The most popular items therefore have tens of thousands
of distinct neighbours (hubs). Each user yields leave-one-out training prefixes, one validation and one test instance;
training rows are streamed to :meth:`ItemRelations.from_chunks` in chunks of 1M rows.
``scale_run`` returns flat keys: ``seconds/{data,relations,labels}``, ``memgen/instances_per_second``,
``memgen/ratio/<label>``, ``memgen/num_pairs/h{1..H}``, ``memory/peak_rss_gb``; with ``--predictions K``
``seconds/prediction_labels`` (m·K cases), with ``--tokens`` ``seconds/token_{relations,labels}`` and
``memgen/token/overall/<category>`` (token categories of the item-level generalization cases).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genrec.analysis import (
    ItemRelations,
    PrefixRelations,
    label_instances,
    label_predictions,
    label_ratios,
    token_categories,
    token_distribution,
    token_labels,
)
from genrec.tokenizers.sid import SemanticIdTable

CHUNK_ROWS = 1_000_000


def synthetic_sequences(num_items: int, num_users: int, num_train: int, seed: int = 0,
                        zipf: float = 0.8, p_jump: float = 0.9, max_step: int = 64):
    """Flat item sequences of ``num_users`` users: (items (T,), user_start (U,), user_len (U,), ring_pos (N,)).

    Every user has ≥ 3 items: ≥ 1 training target, then the validation and the test target; the training
    targets sum to ``num_train`` (heavy-tailed per-user counts).
    """
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, num_users)
    extra = rng.multinomial(num_train - num_users, weights / weights.sum()) if num_train > num_users else 0
    # first item + (1 + extra) training targets + validation + test target
    user_len = 4 + np.asarray(extra, dtype=np.int64) + np.zeros(num_users, dtype=np.int64)
    user_start = np.r_[0, np.cumsum(user_len)[:-1]]
    total = int(user_len.sum())

    popularity = 1.0 / np.arange(1, num_items + 1) ** zipf
    by_rank = rng.permutation(num_items)  # item id of popularity rank r
    ring = rng.permutation(num_items)  # item at ring position p
    ring_pos = np.empty(num_items, dtype=np.int64)
    ring_pos[ring] = np.arange(num_items)

    jump = rng.random(total) < p_jump
    jump[user_start] = True
    n_jump = int(jump.sum())
    jump_items = by_rank[rng.choice(num_items, size=n_jump, p=popularity / popularity.sum())]
    step = rng.integers(1, max_step + 1, total) * rng.choice([-1, 1], total)
    step[jump] = 0
    # Ring position = position of the last jump + the steps taken since (one cumsum, no Python loop).
    cum = np.cumsum(step)
    last_jump = np.maximum.accumulate(np.where(jump, np.arange(total), 0))
    base = np.zeros(total, dtype=np.int64)
    base[jump] = ring_pos[jump_items]
    pos = (base[last_jump] + cum - cum[last_jump]) % num_items
    return ring[pos], user_start, user_len, ring_pos


def synthetic_sid(ring_pos: np.ndarray, seed: int = 0, levels: int = 3, codebook_size: int = 256):
    """SID table whose first token is a segment of the item ring (neighbours share it), the others random."""
    rng = np.random.default_rng(seed + 2)
    n = len(ring_pos)
    codes = rng.integers(0, codebook_size, (n, levels))
    codes[:, 0] = ring_pos * codebook_size // n
    return SemanticIdTable.from_codes(np.arange(n), codes, codebook_size, suffix_size=codebook_size)


def windows(items: np.ndarray, user_start: np.ndarray, positions: np.ndarray, owner_start: np.ndarray,
            history: int):
    """(history (n, N) left-padded with -1, target (n,)) for the given target positions."""
    offs = np.arange(-history, 0)
    idx = positions[:, None] + offs[None, :]  # (n, N)
    hist = np.where(idx >= owner_start[:, None], items[np.maximum(idx, 0)], -1)
    return hist, items[positions]


def train_chunks(items, user_start, user_len, history: int, chunk_rows: int = CHUNK_ROWS):
    """Training instances (leave-one-out prefixes) in chunks of ``chunk_rows`` rows."""
    n_train = user_len - 3  # targets at user positions 1..len-3
    owner = np.repeat(np.arange(len(user_len)), n_train)
    rel = np.arange(len(owner)) - np.repeat(np.cumsum(n_train) - n_train, n_train) + 1
    positions = user_start[owner] + rel
    for lo in range(0, len(positions), chunk_rows):
        sl = slice(lo, lo + chunk_rows)
        yield windows(items, user_start, positions[sl], user_start[owner[sl]], history)


class _Timed:
    """Iterator wrapper that keeps the time spent producing items (synthetic data, not relation building)."""

    def __init__(self, it):
        self.it, self.seconds = iter(it), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t


def scale_run(num_items: int = 100_000, num_train: int = 10_000_000, num_test: int = 1_000_000,
              history: int = 20, seed: int = 0, *, predictions: int = 0, zipf: float = 0.8,
              p_jump: float = 0.9, max_step: int = 64, tokens: bool = False) -> dict:
    """Build relations, label the test instances, return timings, ratios and peak memory (flat keys)."""
    t0 = time.perf_counter()
    items, user_start, user_len, ring_pos = synthetic_sequences(num_items, num_test, num_train, seed, zipf, p_jump, max_step)
    test_pos = user_start + user_len - 1
    test_hist, test_target = windows(items, user_start, test_pos, user_start, history)
    t1 = time.perf_counter()
    chunks = _Timed(train_chunks(items, user_start, user_len, history))
    rel = ItemRelations.from_chunks(chunks, num_items)
    t2 = time.perf_counter()
    labels = label_instances(rel, test_hist, test_target)  # (m, len(LABELS))
    t3 = time.perf_counter()
    out: dict[str, float] = {
        "seconds/data": t1 - t0 + chunks.seconds,
        "seconds/relations": t2 - t1 - chunks.seconds,  # without making the synthetic chunks
        "seconds/labels": t3 - t2,
        "memgen/instances_per_second": num_test / (t3 - t2),
    }
    for h in range(1, rel.max_hop + 1):
        out[f"memgen/num_pairs/h{h}"] = float(rel.num_pairs(h))
    for name, ratio in label_ratios(labels).items():
        out[f"memgen/ratio/{name}"] = ratio
    if predictions:
        rng = np.random.default_rng(seed + 1)
        preds = items[rng.integers(0, len(items), (num_test, predictions))]  # (m, K) popularity-shaped
        t4 = time.perf_counter()
        label_predictions(rel, test_hist, preds)
        out["seconds/prediction_labels"] = time.perf_counter() - t4
    if tokens:
        sid = synthetic_sid(ring_pos, seed)
        t5 = time.perf_counter()
        prel = PrefixRelations.from_relations(rel, sid)
        t6 = time.perf_counter()
        cats = token_categories(token_labels(prel, test_hist, test_target))
        out["seconds/token_relations"], out["seconds/token_labels"] = t6 - t5, time.perf_counter() - t6
        for cat, share in token_distribution(labels, cats, prel.num_lengths)["overall"].items():
            out[f"memgen/token/overall/{cat}"] = share
    out["memory/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_items", type=int, default=100_000)
    p.add_argument("--num_train", type=int, default=10_000_000)
    p.add_argument("--num_test", type=int, default=1_000_000)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predictions", type=int, default=0, help="also label K random predictions per case")
    p.add_argument("--zipf", type=float, default=0.8, help="popularity exponent of the jumps")
    p.add_argument("--p_jump", type=float, default=0.9, help="share of steps drawn from the popularity law")
    p.add_argument("--max_step", type=int, default=64, help="largest local move along the item ring")
    p.add_argument("--tokens", action="store_true", help="also the prefix n-gram labels (§10.3, synthetic SIDs)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    res = scale_run(args.num_items, args.num_train, args.num_test, args.history, args.seed,
                    predictions=args.predictions, zipf=args.zipf, p_jump=args.p_jump, max_step=args.max_step, tokens=args.tokens)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
