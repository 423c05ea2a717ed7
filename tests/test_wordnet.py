"""The groupings and exclusions must reproduce the authors' released label sets exactly."""
from __future__ import annotations

import csv
import hashlib

import pytest

from imnet_ablate import wordnet
from imnet_ablate.errors import UserError

BOTTOM_UP = [999, 977, 918, 877, 820, 753, 694, 596, 486, 345, 206, 79, 36, 17, 9, 5, 2, 1]


@pytest.fixture(scope="module")
def h() -> wordnet.Hierarchy:
    return wordnet.load()


def reference_map(reference, name: str) -> dict[str, str]:
    with open(reference / "class_maps" / f"{name}.csv", newline="") as f:
        return {row["orig_wnid"]: row["new_wnid"] for row in csv.DictReader(f)}


def test_hierarchy_matches_reference_classes(h, reference):
    assert list(h.classes) == (reference / "wmigftl" / "synsets.txt").read_text().split()
    assert len(h.checksum) == 64


def test_bottom_up_count_sequence(h):
    assert [len(set(m.values())) for m in wordnet.bottom_up_steps(h)] == BOTTOM_UP


def test_top_down_count_sequence(h):
    assert [len(set(m.values())) for m in wordnet.top_down_steps(h)] == [127, 10, 2, 1]


@pytest.mark.parametrize("n", [918, 753, 486, 79, 9])
def test_bottom_up_equals_authors_map(h, reference, n):
    assert wordnet.bottom_up(h, n) == reference_map(reference, f"down_up_{n}")


@pytest.mark.parametrize("n", [127, 10])
def test_top_down_equals_authors_map(h, reference, n):
    assert wordnet.top_down(h, n) == reference_map(reference, f"up_down_{n}")


@pytest.mark.parametrize("n", [17, 345])
def test_bottom_up_levels_match_authors_class_lists(h, reference, n):
    """The levels the paper did not train on still give the authors' merged classes."""
    lines = (reference / "wmigftl" / "hierarchy" / f"synset_words_down_up_{n}.txt").read_text().splitlines()
    assert set(wordnet.bottom_up(h, n).values()) == {line.split()[0] for line in lines if line.strip()}


def test_parse_grouping(h):
    assert wordnet.parse_grouping(h, None) == wordnet.identity(h)
    assert wordnet.parse_grouping(h, "top-down-127") == wordnet.top_down(h, 127)
    depth3 = wordnet.parse_grouping(h, "depth-3")
    assert all(h.depth(m) == min(3, h.depth(c)) and m in h.chain(c) for c, m in depth3.items())
    assert wordnet.merge_to_depth(h, 100) == wordnet.identity(h)


@pytest.mark.parametrize("spec, words", [("bottom-up-100", "expected one of 999, 977"), ("sideways-3", "unknown"),
                                         ("top-down-5", "127, 10, 2")])
def test_bad_grouping(h, spec, words):
    with pytest.raises(UserError, match=f"subset.grouping={spec}.*{words}"):
        wordnet.parse_grouping(h, spec)


def excluded_by(h, preset):
    return wordnet.excluded(h, (w for ws in wordnet.exclude_synsets(preset).values() for w in ws))


def test_pascal_removes_exactly_the_authors_229(h, reference):
    removed = set((reference / "class_maps" / "pascal_overlap_229_wnids.txt").read_text().split())
    kept = set((reference / "class_maps" / "pascal_removed_771_wnids.txt").read_text().split())
    assert excluded_by(h, "pascal") == removed
    assert set(h.classes) - excluded_by(h, "pascal") == kept


def test_pascal_preset_is_the_authors_fine_list(reference):
    text = (reference / "wmigftl" / "pascal" / "common_pascal_fine.txt").read_text()
    pairs = dict(line.replace("u'", "'").replace("'", "").rstrip(",").split(": ")
                 for line in text.splitlines() if line.startswith("'"))
    assert pairs == wordnet.PASCAL


def test_pascal_literal_also_removes_229_but_swaps_ox_and_pot(h):
    literal, official = excluded_by(h, "pascal-literal"), excluded_by(h, "pascal")
    assert len(literal) == 229
    names = {h.short_name(w) for w in literal ^ official}
    assert names == {"ox", "pot", "daisy", "yellow lady's slipper"}


def test_exclusion_follows_all_hypernym_paths(h):
    """A class under a synset through a second hypernym only is still removed."""
    c = next(c for c in h.classes if len(h.parents[c]) > 1)
    second = h.parents[c][1]
    assert second not in h.chain(c)
    assert c in wordnet.excluded(h, [second])


def test_exclude_forms(h):
    assert wordnet.exclude_synsets(["n02084071"]) == {"n02084071": ["n02084071"]}
    assert wordnet.exclude_synsets({"dog": "n02084071", "cat": ["n02121620"]}) == \
        {"dog": ["n02084071"], "cat": ["n02121620"]}
    assert len(excluded_by(h, ["n02084071"])) == 118  # the paper's dog classes (first-parent dog subtree)
    with pytest.raises(UserError, match="subset.exclude=coco: unknown preset"):
        wordnet.exclude_synsets("coco")
    with pytest.raises(UserError, match="subset.exclude: dog not synset wnids"):
        wordnet.exclude_synsets(["dog"])


def test_halves(h):
    def rank(c):
        return hashlib.sha1(c.encode()).digest()

    for kind in ("min", "random"):
        a, b = wordnet.halves(h, kind, rank)
        assert len(a) == len(b) == 500 and set(a) | set(b) == set(h.classes)
    min_shared = wordnet.shared_synsets(h, *wordnet.halves(h, "min", rank))
    random_shared = wordnet.shared_synsets(h, *wordnet.halves(h, "random", rank))
    assert len(min_shared) <= 10 < 100 < len(random_shared)
