"""VOC reader: XML edge cases and hostile XML, split loading on a hand-written tree, devkit results files."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from imnet_ablate import voc
from imnet_ablate.errors import UserError


def make_xml(width: int = 100, height: int = 80, objects=(), raw_coords: bool = False) -> str:
    """A VOC annotation; each object is (name, (x1, y1, x2, y2), difficult or None to omit the tag)."""
    objs = []
    for name, box, difficult in objects:
        coords = "".join(f"<{t}>{v if raw_coords else int(v) if float(v).is_integer() else v}</{t}>"
                         for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        diff = "" if difficult is None else f"<difficult>{int(difficult)}</difficult>"
        objs.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>{diff}"
                    f"<bndbox>{coords}</bndbox></object>")
    return (f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><segmented>0</segmented>{''.join(objs)}</annotation>")


def write_voc(root: Path, annotations: dict[str, str], splits: dict[str, list[str]], jpegs: bool = True) -> Path:
    """A VOCdevkit tree with the given XML texts and split files; returns the VOCdevkit folder."""
    year = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for image_id, text in annotations.items():
        (year / "Annotations" / f"{image_id}.xml").write_text(text)
        if jpegs:
            (year / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    for split, ids in splits.items():
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def parse(tmp_path: Path, text: str) -> voc.VocImage:
    path = tmp_path / "000001.xml"
    path.write_text(text)
    return voc.parse_annotation(path)[0]


def test_classes_in_devkit_order():
    assert len(voc.CLASSES) == 20 and voc.CLASSES[0] == "aeroplane" and voc.CLASSES[14] == "person"
    assert voc.CLASSES[-1] == "tvmonitor" and list(voc.CLASSES) == sorted(voc.CLASSES)


def test_single_object_float_coords_and_missing_difficult(tmp_path):
    im = parse(tmp_path, make_xml(objects=[("dog", (10.5, 2, 40.25, 30), None)]))
    assert im.id == "000001" and (im.width, im.height) == (100, 80)
    assert im.boxes.dtype == np.float64 and im.boxes.tolist() == [[10.5, 2.0, 40.25, 30.0]]
    assert im.labels.tolist() == [voc.CLASSES.index("dog")] and im.labels.dtype == np.int64
    assert im.difficult.tolist() == [False] and im.truncated.tolist() == [False]


def test_several_objects_keep_order_and_flags(tmp_path):
    im = parse(tmp_path, make_xml(objects=[("cat", (1, 1, 5, 5), 1), ("person", (2, 3, 100, 80), 0)]))
    assert im.labels.tolist() == [7, 14] and im.difficult.tolist() == [True, False]
    assert im.boxes.shape == (2, 4)
    with pytest.raises(ValueError):
        im.boxes[0, 0] = 3  # shared through the cache, so read-only


def test_no_objects_gives_empty_arrays(tmp_path):
    im = parse(tmp_path, make_xml())
    assert im.boxes.shape == (0, 4) and im.labels.shape == (0,)


@pytest.mark.parametrize("text, fragment", [
    ("<annotation><size><width>10</width>", "malformed XML"),
    (make_xml(objects=[("unicorn", (1, 1, 5, 5), 0)]), "unknown class 'unicorn'"),
    (make_xml(objects=[("dog", (9, 1, 5, 5), 0)]), "x2 < x1"),
    (make_xml(objects=[("dog", ("a", 1, 5, 5), 0)], raw_coords=True), "not a number"),
    ("<annotation><object><name>dog</name></object></annotation>", "missing <size>"),
])
def test_bad_annotations_name_the_file(tmp_path, text, fragment):
    with pytest.raises(UserError, match=fragment) as e:
        parse(tmp_path, text)
    assert "000001.xml" in str(e.value)


BOMB = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><annotation><folder>&lol3;</folder></annotation>')
EXTERNAL = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
            '<annotation><folder>&xxe;</folder></annotation>')


@pytest.mark.parametrize("text", [BOMB, EXTERNAL])
def test_entities_and_dtds_are_refused(tmp_path, text):
    with pytest.raises(UserError, match="refused"):
        parse(tmp_path, text)


def test_box_outside_image_is_a_counted_warning_and_kept(tmp_path, caplog):
    root = write_voc(tmp_path / "VOCdevkit", {"a": make_xml(50, 40, [("dog", (1, 1, 51, 40), 0)]),
                                              "b": make_xml(50, 40, [("cat", (0, 1, 10, 10), 0)])},
                     {"outside": ["a", "b"]})
    with caplog.at_level(logging.WARNING, logger="imnet_ablate.voc"):
        images = voc.load_split(root, "outside")
    assert images[0].boxes.tolist() == [[1, 1, 51, 40]]
    assert "2 box(es)" in caplog.text and "a.xml" in caplog.text and "b.xml" in caplog.text


def test_load_split_in_file_order(tmp_path):
    anns = {"000009": make_xml(objects=[("car", (1, 1, 9, 9), 0)]), "000002": make_xml(objects=[])}
    root = write_voc(tmp_path / "VOCdevkit", anns, {"test": ["000009", "000002"]})
    images = voc.load_split(root, "test")
    assert [im.id for im in images] == ["000009", "000002"]
    assert voc.load_split(root / "VOC2007", "test")[0].labels.tolist() == [6]  # the year folder works too
    assert voc.image_path(root, "000009") == root / "VOC2007" / "JPEGImages" / "000009.jpg"


def test_rewritten_split_is_read_again(tmp_path):
    anns = {"a": make_xml(), "b": make_xml()}
    root = write_voc(tmp_path / "VOCdevkit", anns, {"val": ["a"]})
    assert len(voc.load_split(root, "val")) == 1
    split = root / "VOC2007" / "ImageSets" / "Main" / "val.txt"
    split.write_text("a\nb\n")
    os.utime(split, ns=(split.stat().st_atime_ns, split.stat().st_mtime_ns + 10**9))
    assert len(voc.load_split(root, "val")) == 2


def test_missing_files_are_errors_collected_in_one_message(tmp_path):
    root = write_voc(tmp_path / "VOCdevkit", {"a": make_xml(), "b": make_xml()}, {"test": ["a", "b", "c"]},
                     jpegs=False)
    with pytest.raises(UserError) as e:
        voc.load_split(root, "test")
    msg = str(e.value)
    assert msg.startswith("3 problem(s)") and "c.xml" in msg and "a.jpg" in msg and "b.jpg" in msg
    (root / "VOC2007" / "ImageSets" / "Main" / "test2.txt").write_text("a\nb\n")
    assert len(voc.load_split(root, "test2", check_images=False)) == 2  # scoring needs no JPEGs


def test_missing_split_and_duplicate_ids(tmp_path):
    root = write_voc(tmp_path / "VOCdevkit", {"a": make_xml()}, {"dup": ["a", "a"]})
    with pytest.raises(UserError, match="trainval.txt"):
        voc.load_split(root, "trainval")
    with pytest.raises(UserError, match="listed twice: a"):
        voc.load_split(root, "dup")


# -- results files --------------------------------------------------------------------------------------------------
def test_det_results_round_trip_exactly(tmp_path):
    dets = {"dog": voc.ClassDets(np.array(["000001", "000002"]), np.array([0.1 + 0.2, 1e-7]),
                                 np.array([[1.5, 2, 3, 4], [10, 20, 30.123456789, 40]]))}
    paths = voc.write_det_results(tmp_path, "test", dets)
    assert len(paths) == 20 and (tmp_path / "comp4_det_test_cat.txt").read_text() == ""
    back = voc.read_det_results(tmp_path, "test")
    assert set(back) == set(voc.CLASSES) and len(back["cat"].ids) == 0 and back["cat"].boxes.shape == (0, 4)
    assert back["dog"].ids.tolist() == ["000001", "000002"]
    assert back["dog"].scores.tolist() == [0.1 + 0.2, 1e-7]
    assert np.array_equal(back["dog"].boxes, dets["dog"].boxes)


def test_cls_results_round_trip(tmp_path):
    voc.write_cls_results(tmp_path, "val", {"bus": voc.ClassScores(np.array(["x", "y"]), np.array([-1.25, 3.0]))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comp2_cls_val_bus.txt"]
    back = voc.read_cls_results(tmp_path, "val")
    assert list(back) == ["bus"] and back["bus"].ids.tolist() == ["x", "y"]
    assert back["bus"].scores.tolist() == [-1.25, 3.0]


@pytest.mark.parametrize("bad_line", ["000002 0.5 1 2 3", "000002 high 1 2 3 4", "000002 nan 1 2 3 4",
                                      "000002 0.5 1 2 3 4 5"])
def test_det_reader_names_file_and_line(tmp_path, bad_line):
    (tmp_path / "comp4_det_test_dog.txt").write_text(f"000001 0.9 1 2 3 4\n\n{bad_line}\n")
    with pytest.raises(UserError, match=r"comp4_det_test_dog\.txt:3: malformed line"):
        voc.read_det_results(tmp_path, "test")


def test_cls_reader_names_file_and_line(tmp_path):
    (tmp_path / "comp2_cls_test_cow.txt").write_text("000001 0.9\n000002\n")
    with pytest.raises(UserError, match=r"comp2_cls_test_cow\.txt:2: malformed line \(1 field\(s\)\)"):
        voc.read_cls_results(tmp_path, "test")


def test_readers_take_both_competitions_and_refuse_two_for_one_class(tmp_path, caplog):
    """comp3/comp1 (VOC data only) read like comp4/comp2 (outside data); both files for one class are an error."""
    (tmp_path / "comp3_det_test_dog.txt").write_text("000001 0.9 1 2 3 4\n")
    (tmp_path / "comp4_det_test_cat.txt").write_text("000002 0.5 5 6 7 8\n")
    (tmp_path / "comp1_cls_test_bus.txt").write_text("000001 0.25\n")
    with caplog.at_level(logging.WARNING, logger="imnet_ablate.voc"):
        dets = voc.read_det_results(tmp_path, "test")
    assert dets["dog"].ids.tolist() == ["000001"] and dets["cat"].boxes.tolist() == [[5, 6, 7, 8]]
    assert "comp4 for cat; comp3 for dog" in caplog.text
    assert voc.read_cls_results(tmp_path, "test")["bus"].scores.tolist() == [0.25]
    (tmp_path / "comp4_det_test_dog.txt").write_text("000001 0.8 1 2 3 4\n")
    with pytest.raises(UserError, match=r"comp3_det_test_dog\.txt and comp4_det_test_dog\.txt both score dog; "
                                        r"expected one results file per class \(comp3: trained on VOC data only"):
        voc.read_det_results(tmp_path, "test")


def test_a_root_one_level_too_deep_is_named_as_given_with_the_folder_that_works(tmp_path, monkeypatch):
    write_voc(tmp_path / "VOCdevkit", {"a": make_xml()}, {"test": ["a"]})
    monkeypatch.chdir(tmp_path)
    assert [im.id for im in voc.load_split("VOCdevkit/VOC2007", "test")] == ["a"]  # the year folder itself works
    with pytest.raises(UserError) as e:
        voc.load_split("VOCdevkit/VOC2007/ImageSets", "test")
    assert str(e.value).startswith("VOCdevkit/VOC2007/ImageSets: neither VOC2007/ nor ImageSets/")
    assert str(e.value).endswith("did you mean VOCdevkit/VOC2007?") and "VOC2007/VOC2007" not in str(e.value)
    with pytest.raises(UserError, match=r"^VOCdevkit/VOC2007/ImageSets/Main/val\.txt: cannot read"):
        voc.load_split("VOCdevkit", "val")  # relative, as typed: not resolved to an absolute path
