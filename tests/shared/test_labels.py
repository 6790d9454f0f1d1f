"""The federation's label set: names compared by one rule, a site's class map, refusals that say how to fix them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlens.shared.config import FedConfig, class_key, load_config, parse_classes
from fedlens.shared.data import ClassMap, ImageSet, LabelMismatch, load_class_map, load_dataset, load_image_folder, plan_labels, relabel
from fedlens.shared.errors import ConfigError

FEDERATION = ("normal", "pneumonia", "pleural effusion")


@pytest.mark.parametrize(
    "a, b",
    [("Pneumonia", "pneumonia"), ("Pleural_Effusion", "pleural effusion"), ("pleural-effusion", " Pleural  Effusion "), ("ＡＢＣ", "abc")],
)
def test_names_are_one_class_after_normalisation(a, b):
    assert class_key(a) == class_key(b)


def test_distinct_names_stay_distinct():
    assert class_key("effusion") != class_key("pleural effusion")
    assert class_key("T-shirt/top") == "t shirt/top"


def test_classes_key_is_parsed_validated_and_accepts_a_toml_list(tmp_path):
    assert parse_classes("") == ()
    assert parse_classes("normal, pneumonia ,pleural effusion") == FEDERATION
    path = tmp_path / "run.toml"
    path.write_text('dataset = "folder"\ndata-path = "x"\nclasses = ["normal", "pneumonia", "pleural effusion"]\n')
    cfg = load_config(path)
    assert parse_classes(cfg.classes) == FEDERATION
    (tmp_path / "again.toml").write_text(cfg.to_toml())
    assert load_config(tmp_path / "again.toml") == cfg  # round-trips as one string
    for bad, fragment in [("a, , b", "empty class name"), ("Pneumonia, pneumonia", "twice"), ("a, ignore", "ignore")]:
        with pytest.raises(ConfigError, match=fragment):
            FedConfig.from_mapping({"classes": bad})
    with pytest.raises(ConfigError, match="commas"):
        FedConfig.from_mapping({"classes": ["a,b", "c"]})


def test_sites_missing_classes_keep_the_federation_labels():
    plan = plan_labels(["pneumonia", "Normal"], FEDERATION)
    assert plan.classes == FEDERATION
    assert dict(plan.assigned) == {"pneumonia": 1, "Normal": 0}
    assert plan.missing == ("pleural effusion",)


def test_without_a_label_set_the_sorted_names_are_the_classes():
    plan = plan_labels(["b", "a", "c"])
    assert plan.classes == ("a", "b", "c") and dict(plan.assigned)["c"] == 2


def test_unknown_folders_are_named_with_the_lines_that_would_fix_them():
    with pytest.raises(LabelMismatch) as err:
        plan_labels(["normal", "pneumonie", "scratch"], FEDERATION, where="site-c's data folder /data/x")
    text = str(err.value)
    assert "site-c's data folder /data/x" in text and "'pneumonie', 'scratch'" in text
    assert '"pneumonie" = "pneumonia"' in text  # a close federation name is suggested
    assert '"scratch" = "ignore"' in text and "--class-map" in text


def test_a_class_map_renames_and_ignores():
    cmap = ClassMap.from_mapping({"effusion": "Pleural_Effusion", "Scratch": "ignore"}, source="map.toml")
    plan = plan_labels(["effusion", "normal", "scratch"], FEDERATION, cmap)
    assert dict(plan.assigned) == {"effusion": 2, "normal": 0}
    assert plan.ignored == ("scratch",) and plan.missing == ("pneumonia",)


def test_a_map_line_pointing_nowhere_is_an_error():
    cmap = ClassMap.from_mapping({"effusion": "pleural efusion"}, source="map.toml")
    with pytest.raises(LabelMismatch, match=r"map.toml says 'effusion' = 'pleural efusion'.*not one of the classes"):
        plan_labels(["effusion"], FEDERATION, cmap)


def test_two_folders_on_one_class_need_the_map_to_say_so():
    with pytest.raises(LabelMismatch) as err:
        plan_labels(["Pneumonia", "pneumonia"], FEDERATION)
    assert "'Pneumonia', 'pneumonia'" in str(err.value) and '`"Pneumonia" = "pneumonia"`' in str(err.value)
    assert "\n" not in str(err.value)
    half = ClassMap.from_mapping({"viral pneumonia": "pneumonia"})
    with pytest.raises(LabelMismatch, match="one line each"):
        plan_labels(["pneumonia", "viral pneumonia"], FEDERATION, half)  # only one of the two is named
    both = ClassMap.from_mapping({"viral pneumonia": "pneumonia", "pneumonia": "pneumonia"})
    plan = plan_labels(["pneumonia", "viral pneumonia"], FEDERATION, both)
    assert dict(plan.assigned) == {"pneumonia": 1, "viral pneumonia": 1}


def test_map_lines_match_exact_names_first_then_by_normalisation():
    both = ClassMap.from_mapping({"Pneumonia": "pneumonia", "pneumonia": "pneumonia"})  # folders differing in case only
    assert dict(plan_labels(["Pneumonia", "pneumonia"], FEDERATION, both).assigned) == {"Pneumonia": 1, "pneumonia": 1}
    loose = ClassMap.from_mapping({"EFFUSION": "pleural effusion"})
    assert loose.target("effusion") == "pleural effusion" and loose.line("effusion") == "EFFUSION"
    split = ClassMap.from_mapping({"Effusion": "pleural effusion", "EFFUSION": "ignore"})
    assert split.target("Effusion") == "pleural effusion"  # its exact line
    with pytest.raises(ConfigError, match="say different things"):
        split.target("effusion")


def test_every_problem_is_reported_at_once():
    cmap = ClassMap.from_mapping({"a": "nowhere"})
    with pytest.raises(LabelMismatch) as err:
        plan_labels(["a", "b", "Normal", "normal"], FEDERATION, cmap)
    text = str(err.value)
    assert "'b'" in text and "'nowhere'" in text and "'Normal', 'normal'" in text


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("effusion = ", "not valid TOML"),
        ("[effusion]\nx = 'y'", "tables and numbers are not allowed"),
        ("effusion = 3", "'effusion' is not"),
        ('effusion = ""', "empty name"),
    ],
)
def test_class_map_file_errors_say_what_to_write(tmp_path, content, fragment):
    path = tmp_path / "map.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        load_class_map(path)


def test_class_map_file_is_read(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text('# local = federation\neffusion = "pleural effusion"\n"Lungenentzündung" = "pneumonia"\nscratch = "ignore"\n')
    cmap = load_class_map(path)
    assert cmap.target("EFFUSION") == "pleural effusion" and cmap.target("lungenentzündung") == "pneumonia"
    assert cmap.target("normal") is None
    with pytest.raises(ConfigError, match="does not exist"):
        load_class_map(tmp_path / "absent.toml")


def test_unused_map_lines_are_reported(caplog):
    plan = plan_labels(["normal"], FEDERATION, ClassMap.from_mapping({"efusion": "pleural effusion"}))
    assert plan.unused == ("efusion",) and "efusion" in caplog.text


def test_relabel_maps_arrays_by_name_and_drops_ignored():
    images = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 1]), ("Scratch", "normal", "effusion"), "x")
    cmap = ClassMap.from_mapping({"effusion": "pleural effusion", "scratch": "ignore"})
    out = relabel(images, plan_labels(images.classes, FEDERATION, cmap))
    assert out.classes == FEDERATION and out.labels.tolist() == [0, 2, 0]


def test_folder_loading_follows_the_federation_classes(image_folder):
    # image_folder has alpha, beta, gamma; the federation knows them under other spellings and one more class.
    classes = ("Delta", "GAMMA", "alpha", "the beta")
    cmap = ClassMap.from_mapping({"beta": "the beta"})
    images, _report = load_image_folder(image_folder, image_size=16, classes=classes, class_map=cmap)
    assert images.classes == classes
    assert images.class_counts() == [0, 12, 12, 12]
    ignoring, _ = load_image_folder(image_folder, image_size=16, classes=classes, class_map=ClassMap.from_mapping({"beta": "ignore"}))
    assert ignoring.class_counts() == [0, 12, 12, 0] and len(ignoring) == 24
    with pytest.raises(LabelMismatch, match="'beta'"):
        load_image_folder(image_folder, image_size=16, classes=classes)


def test_a_folder_data_set_takes_classes_and_class_map_from_the_config(image_folder, tmp_path):
    cmap = tmp_path / "map.toml"
    cmap.write_text('alpha = "first"\n')
    cfg = FedConfig.from_mapping(
        {
            "dataset": "folder",
            "data-path": str(image_folder),
            "image-size": 16,
            "classes": "gamma, first, beta, unseen",
            "class-map": str(cmap),
        }
    )
    train, test = load_dataset(cfg)
    assert train.classes == test.classes == ("gamma", "first", "beta", "unseen")
    counts = np.array(train.class_counts()) + np.array(test.class_counts())
    assert counts.tolist() == [12, 12, 12, 0]
