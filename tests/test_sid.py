import numpy as np
import pytest

from genrec.tokenizers.sid import SemanticIdTable, SuffixOverflowError, assign_suffixes


def test_suffix_is_rank_within_prefix_in_item_order():
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 2, 3], [0, 0, 1]])
    assert assign_suffixes(codes, 4, 8).tolist() == [0, 0, 1, 2, 0]
    with pytest.raises(SuffixOverflowError, match=r"3 items share the semantic-ID prefix \(1, 2, 3\)"):
        assign_suffixes(codes, 2, 8)


def test_kept_suffixes_untouched_and_free_rows_take_smallest_free():
    codes = np.array([[1, 1], [1, 1], [1, 1], [2, 2], [1, 1]])
    kept = np.array([2, -1, 0, -1, -1])
    assert assign_suffixes(codes, 5, 4, kept_suffix=kept).tolist() == [2, 1, 0, 0, 3]
    with pytest.raises(SuffixOverflowError):
        assign_suffixes(codes, 3, 4, kept_suffix=kept)


def test_tokens_round_trip_and_unknown_sid():
    table = SemanticIdTable.from_codes(np.array([10, 11, 12]), np.array([[0, 1, 2], [0, 1, 2], [3, 3, 3]]),
                                       codebook_size=4, suffix_size=3)
    assert table.vocab_size == 1 + 3 * 4 + 3
    tok = table.tokens()
    assert tok[0].tolist() == [1, 6, 11, 13] and tok[1].tolist() == [1, 6, 11, 14]
    assert table.items_of_tokens(tok).tolist() == [10, 11, 12]
    assert table.items_of_tokens(np.array([[1, 6, 11, 15]])).tolist() == [-1]
    # a value outside its position's range must not alias another item's SID (code 4 at level 0 = code 0 at level 1)
    assert table.items_of_tokens(np.array([[5, 2, 11, 13]])).tolist() == [-1]
    assert table.tokens_of(np.array([[12, 10]])).shape == (1, 2, 4)
    with pytest.raises(KeyError):
        table.rows_of(np.array([99]))
    assert table.collision_rate() == pytest.approx(1 - 2 / 3)
    assert table.unique_sid_rate() == 1.0


def test_diff_rates_and_persistence(tmp_path):
    old = SemanticIdTable(np.array([0, 1, 2, 3]), np.array([[0, 0], [0, 1], [1, 1], [2, 2]]), np.zeros(4, int), 4, 4)
    new = SemanticIdTable(np.array([0, 1, 2, 3, 4]), np.array([[0, 0], [1, 1], [1, 1], [2, 3], [3, 3]]),
                          np.array([0, 1, 0, 0, 0]), 4, 4)
    d = old.diff(new)
    assert d["level1"] == 0.25 and d["level2"] == 0.25 and d["suffix"] == 0.25 and d["overall"] == 0.5
    assert d["num_new_items"] == 1
    path = tmp_path / "sid.parquet"
    digest = new.save(path)
    back = SemanticIdTable.load(path)
    assert back.content_hash() == digest == new.content_hash()
    assert np.array_equal(back.tokens(), new.tokens())
    assert old.content_hash() != new.content_hash()
    with pytest.raises(ValueError, match="not unique"):
        SemanticIdTable(np.array([0, 1]), np.array([[0, 0], [0, 0]]), np.array([0, 0]), 4, 4)
