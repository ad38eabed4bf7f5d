import pytest
import torch

from flatrobust import models

# Standard parameter counts for 10 classes: PreActResNet-18 with the final BatchNorm of Rice et al.'s
# version (11,172,170; 11,171,146 without it, both "11.17M") and the TRADES WideResNet-34-10.
EXPECTED = {"preactresnet18": 11.17e6, "wrn34_10": 46.16e6, "wrn28_10": 36.48e6, "vgg19": 20.04e6}


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_model_forward_backward(name):
    torch.manual_seed(0)
    size = 8 if name == "smallcnn" else 32
    in_ch = 1 if name == "smallcnn" else 3
    model = models.create(name, num_classes=7, in_channels=in_ch)
    x = torch.rand(2, in_ch, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name,count", sorted(EXPECTED.items()))
def test_parameter_counts_match_standard_definitions(name, count):
    n = sum(p.numel() for p in models.create(name).parameters())
    assert abs(n - count) < 0.01e6, n


@pytest.mark.parametrize("size,in_ch", [(8, 1), (28, 1), (32, 3), (17, 3)])
def test_smallcnn_any_size_and_channels(size, in_ch):
    model = models.create("smallcnn", in_channels=in_ch)
    assert model(torch.rand(3, in_ch, size, size)).shape == (3, 10)


def test_normalization_inside_model():
    model = models.create("smallcnn", in_channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model .resnet9."):
        models.create("resnet9")
    with pytest.raises(ValueError, match="one per channel"):
        models.create("smallcnn", in_channels=3, mean=(0.5,), std=(0.2,))


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_a_channel_mismatch_is_an_error_for_every_model(name):
    """models.create defaults to 3 channels; 1-channel images must not slip through the normalization's broadcasting."""
    rgb = models.create(name, num_classes=10)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\) and got 1 channel, shape \(2, 1, 8, 8\)"):
        rgb(torch.rand(2, 1, 8, 8))
    grey = models.create(name, num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, H, W\) and got 3 channels"):
        grey(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"and got shape \(1, 8, 8\)"):
        grey(torch.rand(1, 8, 8))  # one image without its batch dimension
def test_preactresnet18_width_and_stem_knobs():
    """model_args reach the builder: width scales every stage (parameters ~ width^2), stem_stride halves the resolution."""
    import torch

    from flatrobust import models

    full = models.create("preactresnet18")
    small = models.create("preactresnet18", width=16, stem_stride=2)
    n_full, n_small = (sum(p.numel() for p in m.parameters()) for m in (full, small))
    assert abs(n_full / n_small - 16) < 0.2  # (64 / 16)^2, up to the classifier and BN
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert small.net.conv1.stride == (2, 2)


def test_unknown_model_args_are_one_line_errors():
    import pytest

    from flatrobust import models

    with pytest.raises(ValueError, match="does not take 'depth'"):
        models.create("preactresnet18", depth=3)
