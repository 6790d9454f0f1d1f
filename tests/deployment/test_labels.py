"""Sites that hold different subsets of the federation's classes, under their own names (real processes, TLS, auth)."""

from __future__ import annotations

import json

import pytest

from fedlens.ops.procs import wait_for
from fedlens.shared.checkpoint import read_checkpoint_meta
from fedlens.shared.data.samples import SAMPLE_CLASSES
from fedlens.shared.privacy import PrivacyLedger

from .conftest import SITES, Federation

pytestmark = pytest.mark.deployment


def _folder(root, links: dict[str, object]):
    """A class folder per name, each a link to a sample class folder."""
    root.mkdir()
    for name, target in links.items():
        (root / name).symlink_to(target)
    return root


def test_sites_with_different_classes_and_names_train_one_model_and_a_disagreeing_site_is_refused(federation: Federation, tmp_path):
    data = federation.data
    federation.data = {
        **data,
        # Disagrees: 'shoe' is no class of this federation, and no class map says what it is.
        "site-a": _folder(
            tmp_path / "a", {"Trouser": data["site-a"] / "trouser", "bag": data["site-a"] / "bag", "shoe": data["site-a"] / "sneaker"}
        ),
        # Has never seen a sneaker.
        "site-b": _folder(tmp_path / "b", {"trouser": data["site-b"] / "trouser", "bag": data["site-b"] / "bag"}),
        # Its own names, mapped by its class map; one local class the federation does not train.
        "site-c": _folder(
            tmp_path / "c",
            {
                "pants": data["site-c"] / "trouser",
                "Handbag": data["site-c"] / "bag",
                "sneaker": data["site-c"] / "sneaker",
                "returns": data["site-a"] / "sneaker",
            },
        ),
    }
    class_map = tmp_path / "site-c-map.toml"
    class_map.write_text('pants = "trouser"\nhandbag = "bag"\nreturns = "ignore"\n')
    for site in SITES:
        federation.start_site(site, *(["--class-map", str(class_map)] if site == "site-c" else []))
    wait_for(lambda: federation.online() == set(SITES), 90, "three sites online")

    out = tmp_path / "run"
    run = federation.start_run(out)  # the server's evaluation folder holds all three classes
    assert run.wait(timeout=600) == 0, federation.procs.log("run")[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["private"], summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["sites_train"]) == {"site-b", "site-c"} for r in records), records
    refusal = " ".join(summary["site_failures"]["site-a"])
    assert "LabelMismatch" in refusal and "'shoe'" in refusal, refusal
    assert "site-a" in federation.procs.log("run") and "'shoe'" in federation.procs.log("run")
    assert PrivacyLedger(federation.root / "state" / "site-a").entries() == []  # nothing trained on mismatched labels
    federation_classes = sorted(SAMPLE_CLASSES)
    for site in ("site-b", "site-c"):
        assert [e.round for e in PrivacyLedger(federation.root / "state" / site).entries()] == [1, 2]
        kept = read_checkpoint_meta(federation.root / "state" / site / "global-model.safetensors")
        assert kept["classes"] == federation_classes and kept["round"] == 2  # the federation's classifier, not the site's
    assert "site-b: 40 images in 2 of the federation's 3 classes (none of sneaker)" in federation.procs.log("site-b")
    assert "site-c: 60 images in 3 of the federation's 3 classes" in federation.procs.log("site-c")
    # Each site checked its data at start; the report stays in its state folder.
    check = json.loads((federation.root / "state" / "site-c" / "data-check.json").read_text())
    assert check["class_map"] == f"class map {class_map}" and check["ignored"] == ["returns"]
    assert {name: f["class"] for name, f in check["folders"].items()} == {
        "Handbag": "bag",
        "pants": "trouser",
        "returns": "ignore",
        "sneaker": "sneaker",
    }
    assert "the full data check is in" in federation.procs.log("site-c")
