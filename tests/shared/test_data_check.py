"""The data check: a site's folder against the federation's classes, before it joins."""

from __future__ import annotations

import json

from fedlens.shared.data import DATA_CHECK_FILE, ClassMap, check_data, scan_folder, write_data_check

from .check_folder import write_check_folder

FEDERATION = ("trouser", "bag", "belt", "sneaker")
MAX = 100_000_000


def test_the_check_finds_unknown_missing_and_tiny_classes_skipped_files_and_duplicates(tmp_path):
    scan = scan_folder(write_check_folder(tmp_path / "site"), max_pixels=MAX)
    check = check_data(scan, classes=FEDERATION, batch_size=64, eval_fraction=0.1, classes_from="--classes")
    report = check.to_dict()
    assert report["per_class"] == {"trouser": 12, "bag": 14, "belt": 3, "sneaker": 0}
    assert report["missing"] == ["sneaker"] and report["tiny"] == ["belt"] and report["unknown"] == ["shoe"]
    assert report["folders"]["Trouser"] == {"images": 12, "skipped": 0, "class": "trouser"}
    assert report["folders"]["shoe"]["class"] is None and report["folders"]["bag"]["skipped"] == 2
    (problem,) = report["problems"]
    assert "'shoe'" in problem and '`"shoe" = "ignore"`' in problem
    assert report["skipped"]["files"] == 2 and set(report["skipped"]["by_reason"]) == {"not an image", "truncated"}
    assert any(line.startswith("bag/cut.jpg: truncated") for line in report["skipped"]["first"])
    assert report["label_conflicts"] == {"groups": 1, "first": [["Trouser/Trouser_0.png", "bag/also_a_trouser.png"]]}
    assert report["duplicates"] == {"groups": 1, "extra_copies": 1, "first": [["bag/bag_1.png", "bag/bag_1_copy.png"]]}
    facts = report["image_facts"]
    assert facts["modes"] == {"L": 20, "RGB": 13} and facts["bit_depths"] == {"8": 33}
    assert facts["smallest"] == [24, 24] and facts["largest"] == [48, 48]
    warnings = " ".join(report["warnings"])
    for fragment in (
        "not more than one batch (batch-size 64)",
        "belt (3)",
        "filed under two or more classes",
        "1 exact duplicate",
        "grey images per class",
        "image sizes differ by class",
    ):
        assert fragment in warnings, fragment
    summary = "\n".join(check.summary())
    assert "against 4 classes from --classes" in summary and "sneaker 0" in summary and "WOULD BE REFUSED" in summary


def test_a_class_map_fixes_the_refusal_and_ignored_folders_are_left_out(tmp_path):
    scan = scan_folder(write_check_folder(tmp_path / "site"), max_pixels=MAX)
    cmap = ClassMap.from_mapping({"shoe": "ignore"}, source="map.toml")
    check = check_data(scan, classes=FEDERATION, class_map=cmap, batch_size=None, eval_fraction=0.1)
    report = check.to_dict()
    assert report["problems"] == [] and report["ignored"] == ["shoe"] and report["class_map"] == "map.toml"
    assert report["folders"]["shoe"]["class"] == "ignore" and check.images == 29
    assert not any("batch" in w for w in report["warnings"])  # batch-size not known: no batch warning
    path = write_data_check(check, tmp_path / "state")
    assert path == tmp_path / "state" / DATA_CHECK_FILE and json.loads(path.read_text()) == report


def test_without_the_federations_classes_the_folders_are_the_classes(tmp_path):
    root = write_check_folder(tmp_path / "site")
    (root / "trouser").mkdir()  # 'Trouser' and 'trouser': one class twice
    check = check_data(scan_folder(root, max_pixels=MAX), batch_size=None, eval_fraction=0.0)
    assert check.to_dict()["classes_from"] is None
    (problem,) = check.problems
    assert "'Trouser', 'trouser'" in problem and "one line each" in problem
