"""The default backbone's ImageNet head recognises real photos: the weights are real."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models._meta import _IMAGENET_CATEGORIES

from fedlens.shared.models import create_model, get_backbone

skimage_data = pytest.importorskip("skimage.data")


@pytest.mark.parametrize("photo, expected", [("coffee", {"espresso"}), ("chelsea", {"Egyptian cat", "tabby", "tiger cat"})])
def test_lite0_imagenet_head_classifies_real_photos(photo, expected):
    model = create_model("efficientnet-lite0", num_classes=1000).eval()
    img = Image.fromarray(getattr(skimage_data, photo)()).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    transform = get_backbone("efficientnet-lite0").transforms(image_size=224)
    with torch.no_grad():
        probs = model(transform(x)).softmax(-1)[0]
    top = int(probs.argmax())
    assert _IMAGENET_CATEGORIES[top] in expected
    assert float(probs[top]) > 0.5


@pytest.mark.parametrize("photo, expected", [("coffee", {"espresso"}), ("chelsea", {"Egyptian cat", "tabby", "tiger cat"})])
def test_lite0_with_its_own_preprocessing_classifies_uncropped_photos(photo, expected):
    # The raw 400 x 600 / 300 x 451 photo goes through the backbone's transform: shorter side
    # to 224, centre crop. The crop keeps the subject, so the answer stays right.
    model = create_model("efficientnet-lite0", num_classes=1000).eval()
    x = torch.from_numpy(getattr(skimage_data, photo)()).permute(2, 0, 1)[None].contiguous()
    transform = get_backbone("efficientnet-lite0").transforms()
    assert transform.image_size == 224
    with torch.no_grad():
        probs = model(transform(x)).softmax(-1)[0]
    assert _IMAGENET_CATEGORIES[int(probs.argmax())] in expected
    assert sum(float(probs[_IMAGENET_CATEGORIES.index(c)]) for c in expected) > 0.5
