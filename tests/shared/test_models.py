import pickle

import pytest
import torch
from torch import nn

from fedlens.shared.errors import ConfigError, WeightsError
from fedlens.shared.models import (
    LITE0_SHA256,
    BackboneSpec,
    apply_policy,
    create_model,
    get_backbone,
    list_backbones,
    load_state_dict_file,
    load_trainable,
    parse_policy,
    register_backbone,
    sha256_of,
    trainable_state_dict,
)
from fedlens.shared.models._weights import lite0_weights_path

BACKBONES = list_backbones()


def test_registry_lists_the_shipped_backbones():
    assert {"efficientnet-lite0", "resnet18", "mobilenet_v3_small", "efficientnet_b0"} <= set(BACKBONES)


def test_duplicate_registration_raises():
    spec = get_backbone("resnet18")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(spec)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ConfigError, match="efficientnet-lite0"):
        get_backbone("vgg99")


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_hands_out_its_preprocessing(name):
    spec = get_backbone(name)
    default = spec.transforms()
    assert default.image_size == spec.preprocessing.input_size  # the size the weights were trained at
    small = spec.transforms(image_size=64)
    assert small.image_size == 64 and small.preprocessing == spec.preprocessing
    assert small.key != default.key and small.key == spec.transforms(image_size=64).key
    # Mid-grey in [0, 1] lands where the backbone's mean puts it.
    out = small(torch.full((1, 3, 40, 80), 128, dtype=torch.uint8))
    expected = (128 / 255 - torch.tensor(spec.preprocessing.mean)) / torch.tensor(spec.preprocessing.std)
    assert out.shape == (1, 3, 64, 64) and torch.allclose(out[0, :, 10, 10], expected, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_builds_and_splits_consistently(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        cut = model.block_index(-2)
        split = model.forward_from(model.forward_until(x, cut), cut)
    assert full.shape == (2, 7)
    assert torch.allclose(full, split, atol=1e-5)
    assert isinstance(get_backbone(name), BackboneSpec)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("policy", ["head", "last-1", "last-3", "full"])
def test_policies_freeze_the_right_parts(name, policy):
    model = create_model(name, num_classes=5, pretrained=False)
    cut = apply_policy(model, parse_policy(policy))
    trainable = trainable_state_dict(model)
    assert trainable, "a policy must leave something to train"
    # Only parameters of stages at or after the cut train.
    for key in trainable:
        stage = key.split(".")[1]
        assert list(model.stages._modules).index(stage) >= cut
    # BatchNorm never trains and no buffer travels.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert not any(p.requires_grad for p in module.parameters())
            assert not module.training
    buffers = {n for n, _ in model.named_buffers()}
    assert not buffers & set(trainable)
    # The classifier always trains.
    assert any(k.startswith("stages.classifier") for k in trainable)


def test_policy_sizes_are_ordered():
    sizes = []
    for policy in ["head", "last-1", "last-2", "full"]:
        model = create_model("efficientnet-lite0", num_classes=10, pretrained=False)
        apply_policy(model, parse_policy(policy))
        sizes.append(sum(v.numel() for v in trainable_state_dict(model).values()))
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_last_n_beyond_the_backbone_is_an_error():
    model = create_model("resnet18", num_classes=3, pretrained=False)
    with pytest.raises(ConfigError, match="at most last-8"):
        apply_policy(model, parse_policy("last-9"))


def test_trainable_state_round_trips_and_rejects_mismatches():
    a = create_model("efficientnet-lite0", num_classes=4, pretrained=False)
    b = create_model("efficientnet-lite0", num_classes=4, pretrained=False)
    for m in (a, b):
        apply_policy(m, parse_policy("last-1"))
    with torch.no_grad():
        for p in trainable_state_dict(a).values():
            p.add_(1.0)
    load_trainable(b, trainable_state_dict(a))
    assert all(torch.equal(x, y) for x, y in zip(trainable_state_dict(a).values(), trainable_state_dict(b).values()))
    c = create_model("efficientnet-lite0", num_classes=4, pretrained=False)
    apply_policy(c, parse_policy("head"))
    with pytest.raises(ValueError, match="do not match"):
        load_trainable(c, trainable_state_dict(a))


def test_residual_blocks_add_out_of_place():
    """Opacus' hooks fail on in-place adds; every trainable block must avoid them."""
    for name in BACKBONES:
        model = create_model(name, num_classes=3, pretrained=False)
        apply_policy(model, parse_policy("full"))
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        out = model(x)
        out.sum().backward()  # would raise on in-place modification of a hooked view
        assert x.grad is not None
        assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_lite0_weights_are_hash_checked(tmp_path):
    path = lite0_weights_path()
    assert sha256_of(path) == LITE0_SHA256
    tampered = tmp_path / "lite0.pth"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        create_model("efficientnet-lite0", num_classes=10, weights_path=str(tampered))


def test_pretrained_lite0_really_loads_imagenet_weights():
    pretrained = create_model("efficientnet-lite0", num_classes=1000)
    state = load_state_dict_file(lite0_weights_path())
    assert torch.equal(pretrained.stages.stem[0][1].weight, state["_conv_stem.weight"])
    assert torch.equal(pretrained.stages.classifier[1].weight, state["_fc.weight"])


def test_new_classifier_starts_at_zero_but_backbone_is_pretrained():
    model = create_model("efficientnet-lite0", num_classes=10)
    assert model.stages.classifier[-1].weight.abs().sum() == 0
    random = create_model("efficientnet-lite0", num_classes=10, pretrained=False)
    assert not torch.equal(model.stages.block0.body[0].weight, random.stages.block0.body[0].weight)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(WeightsError, match="arbitrary code"):
        load_state_dict_file(path)


def test_torchvision_backbone_loads_a_local_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("resnet18", num_classes=1000, weights_path=str(path))
    assert torch.equal(model.stages.stem[0].weight, reference.conv1.weight)
    # A wrong file is a clear error, not random weights.
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        create_model("resnet18", num_classes=10, weights_path=str(path))


def test_missing_weights_file_is_an_error_not_random_weights(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("mobilenet_v3_small", num_classes=10, weights_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="pretrained = false"):
        create_model("resnet18", num_classes=10, pretrained=False, weights_path="x.pth")


def test_low_rank_adapters_start_from_the_pretrained_function_and_train_few_numbers():
    from fedlens.shared.config import FedConfig
    from fedlens.shared.privacy import resolve_dp_mode
    from fedlens.shared.task import Task

    plain = Task(FedConfig(image_size=32, device="cpu"), 3)
    adapted = Task(FedConfig(image_size=32, device="cpu", lora_rank=8), 3)
    x = torch.randn(2, 320, 1, 1)
    plain.model.eval()
    adapted.model.eval()
    with torch.no_grad():  # the zero-initialised up-projection leaves the function unchanged
        torch.testing.assert_close(plain.head[0](x), adapted.head[0](x))
    sizes = {k: v.numel() for k, v in adapted.trainable_state().items()}
    assert sum(sizes.values()) == 8 * 320 + 1280 * 8 + 3 * 1280 + 3
    assert not any("base" in k for k in sizes)  # the pretrained convolution stays frozen and home
    assert resolve_dp_mode(adapted.head, "auto") == "book-keeping"
