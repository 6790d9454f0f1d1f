"""``fedlens serve`` as a real process over real HTTP: the API, bad input, back-pressure, explanations, metrics."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fedlens.ops.cli import main
from fedlens.ops.procs import wait_for
from fedlens.shared.inference import TorchPredictor, load_model, stack_images

from ..shared.inference_models import CLASSES, checkpoint, random_pictures
from ..shared.test_dicom import dicom, gradient, save
from .serving import serving

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return checkpoint(root / "run", str(root / "cache"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    return random_pictures(tmp_path_factory.mktemp("pictures"), 4, seed=0)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    args = ("--max-batch", "4", "--max-queue", "2", "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-image-pixels", "4000000")
    with serving(model.parent, tmp_path_factory.mktemp("logs"), *args) as s:
        yield s


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _expected(model, pictures):
    predictor = TorchPredictor(load_model(model))
    return predictor.probabilities(stack_images([predictor.decode(p) for p in pictures]))


def test_health_openapi_and_the_page_are_served_without_anything_external(server):
    with server.client() as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        spec = c.get("/openapi.json").json()
        page = c.get("/")
        docs = c.get("/docs")

    assert {"/predict", "/v2/models/{name}/infer", "/v2/models/{name}", "/v2/health/live", "/metrics"} <= set(spec["paths"])
    assert {"multipart/form-data", "application/json"} <= set(spec["paths"]["/predict"]["post"]["requestBody"]["content"])
    assert docs.status_code == 404, "FastAPI's /docs loads Swagger UI from a CDN; it must stay off"
    assert page.status_code == 200 and "<input id='file' type='file'" in page.text
    for external in ("http://", "https://", "<link", "@import", "src='//", 'src="//'):
        assert external not in page.text, f"the page refers to something external ({external})"


def test_model_info_carries_the_version_and_the_privacy_card(server, model):
    info = server.client().get("/v2/models/fedlens").json()

    assert info["name"] == "fedlens" and len(info["versions"]) == 1 and len(info["versions"][0]) == 12
    f = info["fedlens"]
    assert f["classes"] == CLASSES and f["image_size"] == 32 and f["backend"] == "torch" and f["loaded_at"].endswith("+00:00")
    card = f["card"]
    assert card["backbone"] == "efficientnet-lite0" and card["rounds"] == 3 and card["sites"] == 2
    assert card["site_privacy"] == {"site-a": {"epsilon": 2.5, "delta": 1e-5}, "site-b": "not private"}
    assert card["private"] is False and f["reloads"] == 0 and f["last_reload_error"] is None
    assert server.client().get("/v2/models/other").status_code == 404


def test_predict_multipart_and_json_agree_with_the_training_decoder(server, model, pictures):
    expected = _expected(model, pictures)
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in pictures]
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in pictures]
    with server.client() as c:
        multipart = c.post("/predict", files=files, params={"top_k": 3})
        as_json = c.post("/predict", json={"images": [f"data:image/png;base64,{b64[0]}", *b64[1:]], "top_k": 2})

    assert multipart.status_code == 200, multipart.text
    assert as_json.status_code == 200, as_json.text
    m, j = multipart.json(), as_json.json()
    assert len(m["predictions"]) == len(j["predictions"]) == len(pictures)
    assert m["model"]["version"] == j["model"]["version"] and j["top_k"] == 2
    for row, mp, jp in zip(expected, m["predictions"], j["predictions"]):
        best = int(np.argmax(row))
        assert [t["label"] for t in mp["top"]][0] == CLASSES[best] == jp["top"][0]["label"]
        assert mp["top"][0]["probability"] == pytest.approx(float(row[best]), abs=1e-5)
        assert len(mp["top"]) == 3 and len(jp["top"]) == 2 and mp["top"][:2] == jp["top"]


def test_a_dicom_upload_goes_through_the_dicom_reader(server, model, tmp_path):
    scan = save(dicom(gradient(), WindowCenter=2048, WindowWidth=4096), tmp_path / "scan.dcm")
    expected = _expected(model, [scan])[0]

    r = server.client().post("/predict", files={"file": ("upload", scan.read_bytes(), "application/dicom")})

    assert r.status_code == 200, r.text
    top = r.json()["predictions"][0]["top"][0]
    assert top["label"] == CLASSES[int(expected.argmax())] and top["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_v2_infer_takes_decoded_pixels_and_image_files(server, model, pictures):
    predictor = TorchPredictor(load_model(model))
    decoded = stack_images([predictor.decode(p) for p in pictures[:2]]).numpy()  # one grey, one colour: both as RGB
    expected = predictor.probabilities(stack_images(list(decoded)))
    tensor = {"name": "images", "shape": list(decoded.shape), "datatype": "UINT8", "data": decoded.ravel().tolist()}
    files = {"name": "images", "shape": [2], "datatype": "BYTES", "data": [base64.b64encode(p.read_bytes()).decode() for p in pictures[:2]]}
    with server.client() as c:
        pixels = c.post("/v2/models/fedlens/infer", json={"id": "r1", "inputs": [tensor], "parameters": {"top_k": 1}})
        by_file = c.post("/v2/models/fedlens/infer", json={"inputs": [files]})
        wrong = c.post("/v2/models/fedlens/infer", json={"inputs": [{**tensor, "shape": [2, 3, 5, 5]}]})

    assert pixels.status_code == 200, pixels.text
    out = {o["name"]: o for o in pixels.json()["outputs"]}
    assert pixels.json()["id"] == "r1" and out["probabilities"]["shape"] == [2, 3]
    assert np.allclose(np.reshape(out["probabilities"]["data"], (2, 3)), expected, atol=1e-5)
    assert out["labels"]["shape"] == [2, 1] and out["labels"]["data"] == [CLASSES[i] for i in expected.argmax(1)]
    files_out = {o["name"]: o for o in by_file.json()["outputs"]}
    assert np.allclose(np.reshape(files_out["probabilities"]["data"], (2, 3)), expected, atol=1e-5)
    assert wrong.status_code == 422 and "needs 150 values" in wrong.json()["error"]


def test_bad_input_gets_a_json_error_and_the_service_stays_up(server, pictures, tmp_path):
    good = pictures[0].read_bytes()
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="BMP")  # uncompressed: over the 1 MB upload limit
    with server.client() as c:
        text = c.post("/predict", files={"file": ("notes.png", b"hello, not an image", "image/png")})
        truncated = c.post("/predict", files={"file": ("cut.png", good[: len(good) // 2], "image/png")})
        oversize = c.post("/predict", files={"file": ("big.bmp", buf.getvalue(), "image/bmp")})
        bomb = c.post("/predict", files={"file": ("bomb.png", _png(100_000, 100_000), "image/png")})
        bomb_json = c.post("/predict", json={"images": [base64.b64encode(_png(30_000, 30_000)).decode()]})
        not_base64 = c.post("/predict", json={"images": ["***"]})
        wrong_type = c.post("/predict", content=good, headers={"content-type": "image/png"})
        unknown_method = c.post("/predict", files={"file": ("a.png", good, "image/png")}, params={"explain": "astrology"})
        after = c.post("/predict", files={"file": ("a.png", good, "image/png")})

    assert text.status_code == 415 and "not an image" in text.json()["error"] and "notes.png" in text.json()["error"]
    assert truncated.status_code == 422 and "truncated" in truncated.json()["error"]
    assert oversize.status_code == 413 and "upload limit" in oversize.json()["error"]
    assert bomb.status_code == 413 and "decompression bomb" in bomb.json()["error"]
    assert bomb_json.status_code == 413
    assert not_base64.status_code == 422 and "base64" in not_base64.json()["error"]
    assert wrong_type.status_code == 415
    assert unknown_method.status_code == 422 and "gradcam" in unknown_method.json()["error"]
    assert after.status_code == 200, "the service answers normally after bad input"


def test_a_burst_beyond_the_queue_gets_503_with_retry_after(server, pictures):
    files = [("file", (f"{i}.png", pictures[i % len(pictures)].read_bytes(), "image/png")) for i in range(32)]

    def one(_: int):
        with server.client() as c:
            return c.post("/predict", files=files)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(32)))

    statuses = sorted({r.status_code for r in answers})
    refused = [r for r in answers if r.status_code == 503]
    assert set(statuses) <= {200, 503}, statuses
    assert refused, "32 requests of 32 images at once against a queue of 2 must be refused in part"
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"] for r in refused)
    assert any(r.status_code == 200 for r in answers)


def test_explanation_on_request_returns_an_overlay(server, pictures):
    with server.client() as c:
        r = c.post("/predict", files={"file": ("a.png", pictures[1].read_bytes(), "image/png")}, params={"explain": "gradcam"})

    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    e = p["explanation"]
    assert e["method"] == "grad-cam" and e["class"] == p["top"][0]["label"]
    assert "not a diagnosis" in e["caveat"] and "faithfulness" in e["caveat"]
    assert e["overlay"].startswith("data:image/png;base64,")
    overlay = Image.open(io.BytesIO(base64.b64decode(e["overlay"].split(",", 1)[1])))
    assert overlay.size == (32, 32) and overlay.mode == "RGB"


def test_a_second_explanation_while_one_runs_gets_503(server, pictures):
    files = [("file", (f"{i}.png", pictures[i].read_bytes(), "image/png")) for i in range(4)]
    one = {"file": ("a.png", pictures[0].read_bytes(), "image/png")}

    def running() -> bool:
        return "fedlens_serve_explanations_running 1.0" in server.client().get("/metrics").text

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: server.client().post("/predict", files=files, params={"explain": "ig"}))
        wait_for(lambda: running() or first.done(), 60, "the first explanation to start", interval=0.02)
        assert not first.done(), "the first explanation ended before the second could be sent"
        second = server.client().post("/predict", files=one, params={"explain": "occlusion"})
        plain = server.client().post("/predict", files=one)
        first_answer = first.result(timeout=120)

    assert second.status_code == 503 and second.headers["retry-after"] == "1" and "one at a time" in second.json()["error"]
    assert plain.status_code == 200, "predictions without an explanation are not held up"
    assert first_answer.status_code == 200 and len(first_answer.json()["predictions"]) == 4
    assert all(p["explanation"]["method"] == "integrated-gradients" for p in first_answer.json()["predictions"])


def test_metrics_count_requests_batches_and_the_model(server, pictures):
    with server.client() as c:
        c.post("/predict", files={"file": ("a.png", pictures[0].read_bytes(), "image/png")})
        c.post("/predict", files={"file": ("x.png", b"nope", "image/png")})
        text = c.get("/metrics").text

    assert 'fedlens_serve_requests_total{route="/predict",status="200"}' in text
    assert 'fedlens_serve_requests_total{route="/predict",status="415"}' in text
    assert "fedlens_serve_request_seconds_bucket{" in text and "fedlens_serve_batch_size_count" in text
    assert "fedlens_serve_queue_depth 0.0" in text
    assert 'fedlens_serve_model_info{backend="torch"' in text and "fedlens_serve_model_reload_error 0.0" in text
    assert 'fedlens_serve_rejected_total{reason="bad image"}' in text


def test_a_token_guards_everything_but_liveness(model, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o600)
    with serving(model, tmp_path / "logs", "--token-file", str(token)) as s, s.client() as c:
        assert c.get("/v2/health/live").status_code == 200
        refused = c.get("/v2/models/fedlens")
        wrong = c.get("/metrics", headers={"Authorization": "Bearer guess"})
        ok = c.get("/v2/models/fedlens", headers={"Authorization": "Bearer s3cret-token-0123456789"})

    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401 and ok.status_code == 200
    log = s.log()
    assert "token required" in log and "s3cret" not in log
    assert "fedlens serve: stopped" in log, "SIGTERM stops it gracefully (the lifespan's shutdown ran)"


def test_a_public_address_needs_a_token(model, capsys):
    assert main(["serve", "--model", str(model), "--host", "0.0.0.0"]) == 2
    assert "--token-file" in capsys.readouterr().err
