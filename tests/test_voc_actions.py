"""VOC 2012 action reader: the devkit's person numbering, every problem named by file and line, results files,
and ``ablate data check check.what=voc2012`` on hand-written trees."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import run_ablate

from imnet_ablate import voc_actions as va
from imnet_ablate.errors import UserError


def person_xml(actions=(), box=(10, 20, 40, 70), name="person", flags=None) -> str:
    """One ``<object>``; ``actions`` are the flags set to 1 (``flags`` overrides the whole ``<actions>`` body)."""
    body = flags if flags is not None else "".join(f"<{a}>{int(a in actions)}</{a}>" for a in sorted(va.ACTIONS))
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><actions>{body}</actions><bndbox><xmax>{x2}</xmax><xmin>{x1}</xmin>"
            f"<ymax>{y2}</ymax><ymin>{y1}</ymin></bndbox><difficult>0</difficult><pose>Unspecified</pose></object>")


def annotation(*objects: str, width=100, height=80) -> str:
    return (f"<annotation><filename>x.jpg</filename><folder>VOC2012</folder>{''.join(objects)}"
            f"<size><depth>3</depth><height>{height}</height><width>{width}</width></size></annotation>")


def write_tree(root: Path, people: dict[str, list[set[str]]], splits: dict[str, list[str]], jpegs=True) -> Path:
    """A VOCdevkit holding VOC2012/ with one person object per set of actions, the split files and every scored
    action list (persons in split order, labels from the sets); returns the VOCdevkit folder."""
    year = root / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Action"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for image_id, persons in people.items():
        boxes = [(1 + 10 * k, 2, 9 + 10 * k, 30) for k in range(len(persons))]
        (year / "Annotations" / f"{image_id}.xml").write_text(annotation(*map(person_xml, persons, boxes)))
        if jpegs:
            (year / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    for split, ids in splits.items():
        (year / "ImageSets" / "Action" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for action in va.SCORED:
            lines = [f"{i} {k + 1} {1 if action in acts else -1:2d}\n" for i in ids for k, acts in enumerate(people[i])]
            va.list_path(root, action, split).write_text("".join(lines))
    return root


PEOPLE = {"2012_000001": [{"jumping"}, {"phoning", "walking"}], "2012_000002": [{"other"}],
          "2012_000003": [{"ridinghorse"}]}


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "VOCdevkit", PEOPLE, {"train": ["2012_000001", "2012_000002"],
                                                       "val": ["2012_000003"]})


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def problem_of(root: Path, split: str = "train") -> str:
    with pytest.raises(UserError) as e:
        va.load_split(root, split)
    return str(e.value)


def test_actions_in_the_devkit_order():
    assert va.ACTIONS[0] == "other" and len(va.ACTIONS) == 11 and va.SCORED == va.ACTIONS[1:]
    assert list(va.SCORED) == sorted(va.SCORED) and "ridinghorse" in va.SCORED


def test_load_split_in_list_order_from_the_devkit_or_the_year_folder(tree):
    for root in (tree, tree / "VOC2012"):
        images = va.load_split(root, "train")
        assert [im.id for im in images] == ["2012_000001", "2012_000002"]
        assert (images[0].width, images[0].height) == (100, 80)
        persons = va.listed_persons(images)
        assert [(p.image_id, p.index) for p in persons] == [("2012_000001", 1), ("2012_000001", 2), ("2012_000002", 1)]
        assert persons[1].box == (11.0, 2.0, 19.0, 30.0)
        assert [a for a in va.ACTIONS if persons[1].does(a)] == ["phoning", "walking"] and persons[2].does("other")


def test_person_index_counts_every_object_as_the_devkit_does(tree):
    """``rec.objects(objids(i))``: the index is the position among all <object>s, not only those with actions."""
    xml = va.year_dir(tree) / "Annotations" / "2012_000003.xml"
    xml.write_text(annotation("<object><name>horse</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                              "<ymax>5</ymax></bndbox></object>", person_xml({"ridinghorse"})))
    for action in va.SCORED:
        edit(va.list_path(tree, action, "val"), "2012_000003 1", "2012_000003 2")
    (person,) = va.listed_persons(va.load_split(tree, "val"))
    assert person.index == 2 and person.does("ridinghorse")
    for action in va.SCORED:
        edit(va.list_path(tree, action, "val"), "2012_000003 2", "2012_000003 1")
    assert "person 1 of '2012_000003' is not an <object> with <actions>" in problem_of(tree, "val")


@pytest.mark.parametrize("change, words", [
    (("jumping", "2012_000002 1 -1", "2012_000009 1 -1"), "image '2012_000009' is not in the split"),
    (("jumping", "2012_000002 1 -1", "2012_000001 1 -1"), "listed twice"),
    (("jumping", "2012_000002 1 -1", "2012_000002 x -1"), "person index 'x' is malformed"),
    (("jumping", "2012_000002 1 -1", "2012_000002 1 0"), "label '0' is malformed"),
    (("jumping", "2012_000002 1 -1", "2012_000002 1 -1 7"), "4 fields"),
    (("phoning", "2012_000002 1 -1", "2012_000002 1  1"), "label 1 for ('2012_000002', 1) but 2012_000002.xml has "
                                                          "<phoning>0</phoning>"),
    (("walking", "2012_000001 2", "2012_000001 3"), "names ('2012_000001', 3) where jumping_train.txt:2 names"),
    (("reading", "2012_000002 1 -1\n", ""), "lists 2 persons, jumping_train.txt lists 3"),
])
def test_list_problems_name_file_and_line(tree, change, words):
    action, old, new = change
    edit(va.list_path(tree, action, "train"), old, new)
    message = problem_of(tree)
    assert f"{action}_train.txt:" in message and words in message


def test_a_long_token_is_cut_short(tree):
    edit(va.list_path(tree, "jumping", "train"), "2012_000002 1 -1", "2012_000002 " + "9" * 500 + "x -1")
    message = problem_of(tree)
    assert "jumping_train.txt:3: person index '" + "9" * va.TOKEN_CHARS + "...'" in message
    assert "9" * (va.TOKEN_CHARS + 1) not in message


def test_lists_must_follow_the_split_order(tree):
    for action in va.SCORED:
        path = va.list_path(tree, action, "train")
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join([lines[2], *lines[:2]]))
    assert "out of order; expected persons grouped by image in the order of <split>.txt" in problem_of(tree)


@pytest.mark.parametrize("breakage, words", [
    (lambda root: va.list_path(root, "running", "train").unlink(), "running_train.txt: missing"),
    (lambda root: va.split_path(root, "train").write_text(""), "no image ids"),
    (lambda root: va.split_path(root, "train").unlink(), "Action/train.txt: cannot read"),
    (lambda root: (va.year_dir(root) / "JPEGImages" / "2012_000002.jpg").unlink(), "2012_000002.jpg: missing"),
    (lambda root: (va.year_dir(root) / "Annotations" / "2012_000002.xml").write_text("<annotation>"), "malformed XML"),
    (lambda root: (va.year_dir(root) / "Annotations" / "2012_000002.xml").write_text(
        '<!DOCTYPE a [<!ENTITY x "y">]>' + annotation(person_xml({"other"}))), "refused"),
    (lambda root: (va.year_dir(root) / "Annotations" / "2012_000002.xml").write_text(
        annotation(person_xml(flags="<other>2</other>"))), "<actions><other> is '2', expected 0 or 1"),
    (lambda root: (va.year_dir(root) / "Annotations" / "2012_000002.xml").write_text(
        annotation(person_xml({"other"}, box=(30, 2, 10, 9)))), "x2 < x1"),
])
def test_tree_problems_are_errors(tree, breakage, words):
    breakage(tree)
    assert words in problem_of(tree)


def test_all_problems_of_a_split_in_one_message(tree):
    edit(va.list_path(tree, "jumping", "train"), "2012_000002 1 -1", "2012_000009 1 -1")
    (va.year_dir(tree) / "JPEGImages" / "2012_000001.jpg").unlink()
    message = problem_of(tree)
    assert message.startswith("3 problem(s) in the 'train' action split") and "2012_000009" in message
    # the odd list is reported, not the ten that agree with each other
    assert "2012_000001.jpg: missing" in message
    assert "jumping_train.txt: lists 2 persons, phoning_train.txt lists 3" in message
    assert va.load_split(tree, "val")  # the other split is fine


def test_unlisted_image_is_a_warning(tree, caplog):
    va.split_path(tree, "val").write_text("2012_000002\n2012_000003\n")
    with caplog.at_level(logging.WARNING):
        images = va.load_split(tree, "val")
    assert [im.id for im in images] == ["2012_000002", "2012_000003"] and images[0].persons == ()
    assert "without listed persons" in caplog.text and "2012_000002" in caplog.text


def test_other_list_is_read_when_present(tree):
    lines = "2012_000001 1 -1\n2012_000001 2 -1\n2012_000002 1  1\n"
    va.list_path(tree, "other", "train").write_text(lines)
    assert len(va.listed_persons(va.load_split(tree, "train"))) == 3
    va.list_path(tree, "other", "train").write_text(lines.replace("000002 1  1", "000002 1 -1"))
    assert "other_train.txt:3: label -1" in problem_of(tree)


# -- results files --------------------------------------------------------------------------------------------------
def test_results_round_trip_exactly(tree, tmp_path):
    persons = va.listed_persons(va.load_split(tree, "train"))
    scores = {"jumping": np.array([0.1 + 0.2, -1e-300, 3.0]), "walking": np.array([1.0, 1.0, 2.5])}
    paths = va.write_results(tmp_path, "train", persons, scores)
    assert [p.name for p in paths] == ["comp10_action_train_jumping.txt", "comp10_action_train_walking.txt"]
    assert paths[0].read_text().splitlines()[0] == "2012_000001 1 0.30000000000000004"
    back = va.read_results(tmp_path, "train", persons)
    assert set(back) == {"jumping", "walking"} and back["jumping"].tolist() == scores["jumping"].tolist()
    with pytest.raises(ValueError, match="finite"):
        va.write_results(tmp_path, "train", persons, {"jumping": np.array([1.0, np.nan, 2.0])})


def test_unscored_persons_read_as_minus_infinity(tree, tmp_path):
    persons = va.listed_persons(va.load_split(tree, "train"))
    va.results_path(tmp_path, "train", "reading").write_text("2012_000002 1 0.5\n\n")
    assert va.read_results(tmp_path, "train", persons)["reading"].tolist() == [-np.inf, -np.inf, 0.5]


@pytest.mark.parametrize("line, words", [
    ("2012_000007 1 0.5", "person ('2012_000007', 1) is not listed in the 'train' split"),
    ("2012_000001 3 0.5", "person ('2012_000001', 3) is not listed"),
    ("2012_000001 1 0.25", "person ('2012_000001', 1) scored twice"),
    ("2012_000001 2 nan", "score 'nan' is not a finite number"),
    ("2012_000001 2 high", "score 'high' is not a finite number"),
    ("2012_000001 0 0.5", "person index '0' is not a positive integer"),
    ("2012_000001 2", "2 fields"),
    ("2012_000001 2 0.5 " + "z" * 300, "4 fields"),
])
def test_results_reader_names_file_and_line(tree, tmp_path, line, words):
    persons = va.listed_persons(va.load_split(tree, "train"))
    va.results_path(tmp_path, "train", "running").write_text(f"2012_000001 1 0.5\n{line}\n")
    with pytest.raises(UserError) as e:
        va.read_results(tmp_path, "train", persons)
    assert "comp10_action_train_running.txt:2: " in str(e.value) and words in str(e.value)
    assert "z" * 50 not in str(e.value)


# -- ablate data check check.what=voc2012 ---------------------------------------------------------------------------
def test_check_tree_finds_every_kind_of_problem(tree):
    year = va.year_dir(tree)
    va.split_path(tree, "trainval").write_text("2012_000001\n2012_000002\n2012_000003\n")  # without lists
    (year / "JPEGImages" / "2012_000002.jpg").unlink()
    edit(va.list_path(tree, "phoning", "val"), "2012_000003 1 -1", "2012_000003 1  1")
    found = va.check_tree(tree)
    codes = {(p.path.name.split(":")[0], p.code) for p in found.problems}
    assert ("phoning_val.txt", "action-label") in codes and ("2012_000002.jpg", "action-jpeg") in codes
    assert ("jumping_trainval.txt", "action-list") in codes
    assert [p.name for p in found.jpegs] == ["2012_000001.jpg", "2012_000003.jpg"]
    assert va.check_tree(tree / "nowhere").problems[0].code == "action-folder"


def test_data_check_cli(tree, tmp_path):
    runs = tmp_path / "runs"
    (va.year_dir(tree) / "JPEGImages" / "2012_000001.jpg").write_bytes(b"not a jpeg")
    edit(va.list_path(tree, "walking", "train"), "2012_000002 1 -1", "2012_000002 5 -1")
    proc = run_ablate("data", "check", "check.what=voc2012", "data=imagenet", f"data.voc2012_root={tree}",
                      f"paths.runs={runs}", f"paths.cache={tmp_path / 'cache'}", "check.workers=1", timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "voc2012:VOC2012/ImageSets/Action/walking_train.txt:3 (action-list)" in proc.stderr
    assert "voc2012:VOC2012/JPEGImages/2012_000001.jpg" in proc.stderr
    report = json.loads(next(runs.glob("datacheck/*/report.json")).read_text())
    assert report["usable"] is False and report["datasets"]["voc2012"]["images"] == 3
