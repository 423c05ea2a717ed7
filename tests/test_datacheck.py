"""``ablate data check``: every kind of bad file in an ImageNet tree and a VOC tree gets its documented behaviour."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_ablate, run_dir_of
from imnet_ablate import datacheck, imagenet

GOOD, OTHER = "n01440764", "n01443537"  # two ILSVRC-2012 classes


def jpeg_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A noisy image (noise makes the entropy-coded data long enough for truncation to cut into it)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# relative path -> (content, expected problem codes)
IMAGENET_CASES: dict[str, tuple[bytes, set[str]]] = {
    f"train/{GOOD}/good.JPEG": (jpeg_bytes(), set()),
    f"train/{GOOD}/cmyk.JPEG": (jpeg_bytes(mode="CMYK"), {"cmyk"}),
    f"train/{GOOD}/gray.JPEG": (jpeg_bytes(mode="L"), {"grayscale"}),
    f"train/{GOOD}/png.JPEG": (jpeg_bytes(fmt="PNG"), {"misnamed"}),
    f"train/{GOOD}/tiny.JPEG": (jpeg_bytes(size=(12, 9)), {"tiny"}),
    f"train/{GOOD}/truncated.JPEG": (jpeg_bytes()[:1500], {"truncated"}),
    f"train/{GOOD}/empty.JPEG": (b"", {"empty"}),
    f"train/{GOOD}/corrupt.JPEG": (bytes(np.random.default_rng(1).integers(0, 255, 3000, dtype=np.uint8)),
                                   {"not-an-image"}),
    f"train/{GOOD}/notes.txt": (b"downloaded 2012\n", {"stray-file"}),
    f"train/{OTHER}/a.JPEG": (jpeg_bytes(seed=2), set()),
    "train/README": (b"stray file outside the class folders\n", {"stray-file"}),
    "train/n99999999/x.JPEG": (jpeg_bytes(seed=3), set()),  # reported as its folder, below
    f"val/{GOOD}/v.JPEG": (jpeg_bytes(seed=4), set()),
}
FOLDER_CASES = {"train/n99999999": {"unknown-class"}, "train/not_a_class": {"not-a-wnid"}}
UNUSABLE = {f"train/{GOOD}/{n}.JPEG" for n in ("truncated", "empty", "corrupt")}


@pytest.fixture
def imagenet_tree(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    for rel, (data, _) in IMAGENET_CASES.items():
        write(root / rel, data)
    (root / "train" / "not_a_class").mkdir()
    return root


@pytest.fixture
def clean_imagenet(tmp_path: Path) -> Path:
    root = tmp_path / "clean"
    for rel in (f"train/{GOOD}/good.JPEG", f"train/{GOOD}/cmyk.JPEG", f"train/{OTHER}/a.JPEG"):
        write(root / rel, IMAGENET_CASES[rel][0])
    return root


def check_cfg() -> datacheck.Check:
    return datacheck.Check(what="imagenet", workers=1, max_show=5, min_side=32)


def problems_by_path(findings: list[datacheck.Finding]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        out.setdefault(f.path, set()).add(f.problem)
    return out


def test_every_imagenet_case_is_classified(imagenet_tree: Path) -> None:
    scan = datacheck.scan_imagenet(imagenet_tree, "val", flat_val=False)
    findings, summary = datacheck.check_imagenet(scan, check_cfg())
    expected = {rel: codes for rel, (_, codes) in IMAGENET_CASES.items() if codes} | FOLDER_CASES
    assert problems_by_path(findings) == expected
    assert summary["modes"]["unusable"] == 3 and summary["modes"]["CMYK"] == 1
    errors = {f.path for f in findings if f.severity == "error"}
    assert errors == UNUSABLE | {"train/not_a_class"}


def test_usable_flags_decode_with_the_loaders(imagenet_tree: Path) -> None:
    """What the check calls usable, the training loaders really decode to RGB; what it calls unusable, they drop."""
    from imnet_ablate.loaders import decode

    for name in ("cmyk", "gray", "png", "tiny"):
        img = decode((imagenet_tree / f"train/{GOOD}/{name}.JPEG").read_bytes())
        assert img.shape[0] == 3 and str(img.dtype) == "torch.uint8"
    for rel in UNUSABLE:
        with pytest.raises(ValueError):
            decode((imagenet_tree / rel).read_bytes())


def test_cli_exit_1_names_offending_paths_and_writes_report(imagenet_tree: Path, tmp_path: Path) -> None:
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["data", "check", "data=imagenet", f"data.root={imagenet_tree}", "check.what=imagenet", "check.workers=2",
            f"paths.runs={runs}", f"paths.cache={cache}"]
    proc = run_ablate(*args)
    assert proc.returncode == 1, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "4 error(s)" in message and "run_dir:" not in proc.stdout
    for rel in UNUSABLE:
        assert f"imagenet:{rel}" in message
    report_path = Path(message.split("full report: ")[1].split(" ")[0])
    report = json.loads(report_path.read_text())
    assert report["usable"] is False and report["counts"]["truncated"]["n"] == 1
    assert "loaders convert it to RGB" in proc.stdout  # CMYK/grayscale are flagged as handled, not errors
    done = json.loads((report_path.parent / "DONE").read_text())

    again = run_ablate(*args)  # unchanged tree: the report is reused, same verdict, nothing rewritten
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == message
    assert json.loads((report_path.parent / "DONE").read_text()) == done

    # the subset builder's hook: the unusable files, until one is replaced by a good copy
    assert datacheck.known_bad(imagenet_tree, cache) == UNUSABLE
    shutil.rmtree(imagenet_tree / "train" / "not_a_class")  # the builder refuses non-wnid folders outright
    subset = run_ablate("subset", "data=imagenet", f"data.root={imagenet_tree}", f"subset.classes=[{GOOD},{OTHER}]",
                        f"paths.runs={runs}", f"paths.cache={cache}")
    assert subset.returncode == 0, subset.stderr
    listed = {line.split("\t")[0] for line in (run_dir_of(subset) / "train.tsv").read_text().splitlines()[1:]}
    assert f"train/{GOOD}/good.JPEG" in listed and not listed & UNUSABLE
    write(imagenet_tree / f"train/{GOOD}/empty.JPEG", jpeg_bytes(seed=5))
    assert datacheck.known_bad(imagenet_tree, cache) == UNUSABLE - {f"train/{GOOD}/empty.JPEG"}

    changed = run_ablate(*args)  # the tree changed: checked again, into a new stage folder
    assert changed.returncode == 1 and "2 error(s)" in changed.stderr  # empty.JPEG replaced, not_a_class removed
    assert str(report_path.parent) not in changed.stderr


def test_without_known_bad_drops_files_and_changes_the_checksum(imagenet_tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    names = sorted(r.split("/")[-1] for r in IMAGENET_CASES
                   if r.endswith(".JPEG") and r.startswith(f"train/{GOOD}/"))
    listing = imagenet.Listing(imagenet_tree, {GOOD: imagenet.Files(f"train/{GOOD}/", names)}, {}, "abc",
                               tmp_path / "listing.tsv")
    assert datacheck.without_known_bad(listing, cache) is listing  # no check yet: unchanged
    scan = datacheck.scan_imagenet(imagenet_tree, "val", flat_val=False)
    findings, _ = datacheck.check_imagenet(scan, check_cfg())
    datacheck.write_known_bad(imagenet_tree, cache, findings, tmp_path / "report.json")
    kept = datacheck.without_known_bad(listing, cache)
    assert set(listing.train[GOOD].paths()) - set(kept.train[GOOD].paths()) == UNUSABLE
    assert kept.checksum != listing.checksum


def test_clean_tree_exits_0_and_prints_run_dir(clean_imagenet: Path, tmp_path: Path) -> None:
    proc = run_ablate("data", "check", "data=imagenet", f"data.root={clean_imagenet}", "check.what=imagenet",
                      f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir_of(proc) / "report.json").read_text())
    assert report["usable"] is True and set(report["counts"]) == {"cmyk"}
    assert datacheck.known_bad(clean_imagenet, tmp_path / "cache") == set()


@pytest.mark.parametrize("override, key", [("check.workers=0", "check.workers=0"),
                                           ("check.what=all", "check.what='all'"),
                                           ("check.min_side=-3", "check.min_side=-3")])
def test_bad_check_settings_exit_2(clean_imagenet: Path, tmp_path: Path, override: str, key: str) -> None:
    proc = run_ablate("data", "check", "data=imagenet", f"data.root={clean_imagenet}", override,
                      f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}")
    assert proc.returncode == 2 and key in proc.stderr and "expected" in proc.stderr


# -- VOC ----------------------------------------------------------------------------------------------------------
def voc_xml(objects: str, size: str = "<width>64</width><height>48</height><depth>3</depth>") -> str:
    return f"<annotation><filename>x.jpg</filename><size>{size}</size>{objects}</annotation>"


def voc_object(name: str = "dog", box: tuple = (5, 6, 40, 30)) -> str:
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


ENTITY_BOMB = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
               '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
               '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
               "<annotation><filename>&lol3;</filename></annotation>")

# id -> (annotation text or None, has JPEG, expected problem codes on the annotation / on the JPEG)
VOC_CASES: dict[str, tuple[str | None, bool, set[str], set[str]]] = {
    "000001": (voc_xml(voc_object()), True, set(), set()),
    "000002": ("<annotation><size><width>64</width>", True, {"annotation"}, set()),  # malformed
    "000003": (voc_xml(voc_object(name="unicorn")), True, {"annotation"}, set()),  # schema: unknown class
    "000004": (voc_xml(voc_object(box=(40, 6, 5, 30))), True, {"annotation"}, set()),  # x2 < x1
    "000005": (voc_xml("<object><name>cat</name></object>"), True, {"annotation"}, set()),  # no <bndbox>
    "000006": (ENTITY_BOMB, True, {"annotation"}, set()),  # refused, never expanded
    "000007": (voc_xml(voc_object(box=(5, 6, 90, 30))), True, {"box-outside"}, set()),
    "000008": (voc_xml(voc_object(box=(5, 6, 5, 30))), True, {"box-empty"}, set()),
    "000009": (voc_xml(""), True, {"no-objects"}, set()),
    "000010": (None, True, {"missing-annotation"}, set()),  # listed, no XML
    "000011": (voc_xml(voc_object()), False, set(), {"missing-jpeg"}),  # listed, no JPEG
    "000012": (voc_xml(voc_object(), size="<width>0</width><height>48</height>"), True, {"bad-size"},
               {"size-mismatch"}),
    "000013": (voc_xml(voc_object(), size="<width>100</width><height>48</height>"), True, set(), {"size-mismatch"}),
}
UNLISTED = "000014"  # an annotation in no split file


@pytest.fixture
def voc_tree(tmp_path: Path) -> Path:
    devkit = tmp_path / "VOCdevkit"
    year = devkit / "VOC2007"
    for image_id, (xml, has_jpeg, _, _) in VOC_CASES.items():
        if xml is not None:
            write(year / "Annotations" / f"{image_id}.xml", xml.encode())
        if has_jpeg:
            write(year / "JPEGImages" / f"{image_id}.jpg", jpeg_bytes(seed=int(image_id)))
    write(year / "Annotations" / f"{UNLISTED}.xml", voc_xml(voc_object()).encode())
    ids = sorted(VOC_CASES)
    write(year / "ImageSets/Main/trainval.txt", "".join(f"{i}\n" for i in ids[:7]).encode())
    write(year / "ImageSets/Main/test.txt", "".join(f"{i}\n" for i in ids[7:]).encode())
    return devkit


def test_every_voc_case_is_classified(voc_tree: Path) -> None:
    scan = datacheck.scan_voc(voc_tree)
    findings, summary = datacheck.check_voc(scan, datacheck.Check("voc", workers=2, max_show=5, min_side=32))
    expected: dict[str, set[str]] = {f"VOC2007/Annotations/{UNLISTED}.xml": {"unlisted"}}
    for image_id, (_, _, on_xml, on_jpeg) in VOC_CASES.items():
        if on_xml:
            expected[f"VOC2007/Annotations/{image_id}.xml"] = on_xml
        if on_jpeg:
            expected[f"VOC2007/JPEGImages/{image_id}.jpg"] = on_jpeg
    assert problems_by_path(findings) == expected
    bomb = next(f for f in findings if f.path.endswith("000006.xml"))
    assert "refused" in bomb.detail and "lol" not in bomb.detail
    assert summary["splits"] == {"trainval": 7, "test": 6}


def test_voc_missing_test_split_is_an_error(voc_tree: Path) -> None:
    (voc_tree / "VOC2007/ImageSets/Main/test.txt").unlink()
    (voc_tree / "VOC2007/ImageSets/Main/trainval.txt").write_text("000001\n000001\n")
    scan = datacheck.scan_voc(voc_tree)
    findings, _ = datacheck.check_voc(scan, datacheck.Check("voc", workers=1, max_show=5, min_side=32))
    split_errors = {f.path: f.detail for f in findings if f.problem == "split"}
    assert set(split_errors) == {"VOC2007/ImageSets/Main/test.txt", "VOC2007/ImageSets/Main/trainval.txt"}
    assert "listed twice" in split_errors["VOC2007/ImageSets/Main/trainval.txt"]


def test_voc_root_too_deep_is_one_finding_naming_the_folder_that_works(voc_tree: Path) -> None:
    scan = datacheck.scan_voc(voc_tree / "VOC2007" / "JPEGImages")
    assert [(f.path, f.problem) for f in scan.findings] == [("VOC2007", "missing-folder")]
    assert scan.findings[0].detail.endswith(f"did you mean {voc_tree / 'VOC2007'}?")


def test_voc_cli_exit_1(voc_tree: Path, tmp_path: Path) -> None:
    proc = run_ablate("data", "check", "data=imagenet", f"data.root={tmp_path}", f"data.voc_root={voc_tree}",
                      "check.what=voc", f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}")
    assert proc.returncode == 1, proc.stderr
    assert "voc:VOC2007/Annotations/000002.xml (annotation)" in proc.stderr
    assert not (tmp_path / "cache" / "datacheck").exists()  # no ImageNet verdict written for a VOC-only check


def test_data_root_is_never_written(clean_imagenet: Path, tmp_path: Path) -> None:
    before = sorted((p, p.stat().st_mtime_ns) for p in clean_imagenet.rglob("*"))
    scan = datacheck.scan_imagenet(clean_imagenet, "val", flat_val=False)
    datacheck.check_imagenet(scan, check_cfg())
    assert sorted((p, p.stat().st_mtime_ns) for p in clean_imagenet.rglob("*")) == before
    assert not any(p.name.startswith(".") for p in clean_imagenet.rglob("*"))
    assert os.access(clean_imagenet, os.W_OK)  # the tree was writable: not writing was a choice


# -- what the readers refuse, found first (issue 16) -----------------------------------------------------------------
def test_names_links_and_entries_named_like_images(clean_imagenet: Path, tmp_path: Path) -> None:
    """Every file the listing skips is a bad-name error; a folder or a broken link named like an image is an
    unreadable image (the listing takes it by name); a class folder linked from outside the root is followed and
    reported."""
    import random

    from hostile import SEED, bad_names, make_file

    names = bad_names(random.Random(SEED), 6)
    for name in names:
        make_file(clean_imagenet / "train" / GOOD, name, jpeg_bytes())
    (clean_imagenet / "train" / GOOD / "folder.JPEG").mkdir()
    (clean_imagenet / "train" / GOOD / "dangling.JPEG").symlink_to("gone.JPEG")  # inside the root, broken
    elsewhere = tmp_path / "elsewhere" / "n01484850"
    write(elsewhere / "x.JPEG", jpeg_bytes())
    (clean_imagenet / "train" / "n01484850").symlink_to(elsewhere)
    scan = datacheck.scan_imagenet(clean_imagenet, "val", flat_val=False)
    findings, _ = datacheck.check_imagenet(scan, check_cfg())
    found = problems_by_path(findings)
    bad = {p for p, codes in found.items() if codes == {"bad-name"}}
    assert len(bad) == len(names) and all(p.isprintable() and "\\" in p for p in bad)  # escaped, one line each
    assert found[f"train/{GOOD}/folder.JPEG"] == {"unreadable"} == found[f"train/{GOOD}/dangling.JPEG"]
    assert found["train/n01484850"] == {"symlink-outside"} and "train/n01484850/x.JPEG" in scan.images
    rep = datacheck.report(findings, {})
    json.dumps(rep).encode("utf-8")  # the report is writable as it is (no undecodable name left in it)
    listed = imagenet.list_imagenet(clean_imagenet, tmp_path / "cache")
    assert {f"train/{GOOD}/{n}" for n in listed.train[GOOD].names} == {
        p for p in scan.images if p.startswith(f"train/{GOOD}/")}  # the check decodes what the listing lists


def test_listing_and_label_files_are_read_as_the_listing_reads_them(clean_imagenet: Path, tmp_path: Path) -> None:
    listing = write(tmp_path / "listing.txt", f"train/{GOOD}/good.JPEG\ntrain/{OTHER}/missing.JPEG\n".encode())
    scan = datacheck.scan_imagenet(clean_imagenet, "val", False, train_listing=listing)
    assert sorted(scan.images) == [f"train/{GOOD}/good.JPEG", f"train/{OTHER}/missing.JPEG"]  # not train/'s scan
    findings, _ = datacheck.check_imagenet(scan, check_cfg())
    assert problems_by_path(findings) == {f"train/{OTHER}/missing.JPEG": {"unreadable"}}
    for text in (b"/etc/passwd\tn01440764\n", b"../x.JPEG\tn01440764\n", b"train/\xff.JPEG\n"):
        listing.write_bytes(text)
        scan = datacheck.scan_imagenet(clean_imagenet, "val", False, train_listing=listing)
        (finding,) = scan.findings
        assert finding.problem == "listing" and f"{listing}:1" in finding.detail
    flat = clean_imagenet / "val"
    write(flat / "v1.JPEG", jpeg_bytes())
    scan = datacheck.scan_imagenet(clean_imagenet, "val", flat_val=False)
    assert [f.problem for f in scan.findings if f.path == "val"] == ["listing"]  # images, no class folders
    labels = write(tmp_path / "labels.csv", f"v1.JPEG,{GOOD}\nv2.JPEG,{GOOD}\n".encode())
    scan = datacheck.scan_imagenet(clean_imagenet, "val", True, val_labels=labels)
    assert [f.problem for f in scan.findings] == ["listing"] and "1 labelled files are not in" in scan.findings[0].detail


def test_voc_split_files_the_reader_refuses(voc_tree: Path) -> None:
    main = voc_tree / "VOC2007/ImageSets/Main"
    (main / "test.txt").write_text("\n\n")
    (main / "trainval.txt").unlink()
    os.mkfifo(main / "trainval.txt")
    write(main / "train.txt", b"000001\n../../../etc/passwd\n")
    write(main / "val.txt", b"000001\n\xff\n")
    scan = datacheck.scan_voc(voc_tree)
    details = {f.path.split("/")[-1]: f.detail for f in scan.findings if f.problem == "split"}
    assert set(details) == {"test.txt", "trainval.txt", "train.txt", "val.txt"}
    assert "no image ids" in details["test.txt"] and "is a FIFO" in details["trainval.txt"]
    assert "is a path" in details["train.txt"] and "is not UTF-8" in details["val.txt"]


def test_the_pixel_limit_is_the_loaders(tmp_path: Path) -> None:
    from hostile import bomb_jpeg

    from imnet_ablate import inputs

    bomb = write(tmp_path / "bomb.JPEG", bomb_jpeg())
    assert datacheck.inspect_image(bomb, 32)[0][0][0] == "too-large"
    small = write(tmp_path / "small.JPEG", jpeg_bytes((64, 48)))
    assert datacheck.inspect_image(small, 32, max_pixels=64 * 48)[0] == []
    problems, _ = datacheck.inspect_image(small, 32, max_pixels=64 * 48 - 1)
    assert problems[0][0] == "too-large" and "data.max_pixels=3071" in problems[0][1]
    assert datacheck.PROBLEMS["bad-size"][0] == "warning"  # the readers never use <size>: not an error
    assert inputs.DEFAULT_MAX_PIXELS == datacheck.Check("imagenet", 1, 5, 32).max_pixels
