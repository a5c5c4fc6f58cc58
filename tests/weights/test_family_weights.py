"""The later ResNets against the real torchvision and timm modules (random weights).

One network of each kind (ResNeXt, wide, ResNet-D, SE, SE-ResNeXt,
pre-activation), built by torchvision or timm with randomised BatchNorm
statistics and affine terms, converted, and compared as test_converters.py
does: logits within 1e-4 (relative) in inference and 1e-3 in training mode,
at 224x224 and an odd size. One block per stage keeps them quick; the
converters read the depth off the tensors, and the named depths' parameter
counts are checked against the same libraries in tests/models/test_family.py.
"""

import numpy as np
import pytest

import resnet_jax as rj
from tests.weights.test_converters import check, images, randomise

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from timm.layers import BatchNormAct2d, GroupNormAct, create_conv2d  # noqa: E402
from timm.models.resnet import BasicBlock as TimmBasic  # noqa: E402
from timm.models.resnet import Bottleneck as TimmBottleneck  # noqa: E402
from timm.models.resnet import ResNet as TimmResNet  # noqa: E402
from timm.models.resnetv2 import ResNetV2  # noqa: E402

TV = torchvision.models.resnet
SIZES = ((224, 224), (97, 75))  # odd sizes: ResNet-D's ceil-mode pools see odd inputs


def _kinds():
    one = [1, 1, 1, 1]
    return {
        # name: (source, module builder, expected ResNet fields)
        "resnext": (
            "torchvision",
            lambda: TV.ResNet(TV.Bottleneck, one, groups=32, width_per_group=4),
            dict(groups=32, base_width=4),
        ),
        "wide": (
            "torchvision",
            lambda: TV.ResNet(TV.Bottleneck, [1, 2, 1, 1], width_per_group=128),
            dict(base_width=128, stage_sizes=(1, 2, 1, 1)),
        ),
        "resnet_d_basic": (
            "timm",
            lambda: TimmResNet(
                TimmBasic, [2, 1, 1, 1], stem_type="deep", stem_width=32, avg_down=True
            ),
            dict(stem="deep", avg_down=True, stem_width=64),
        ),
        "resnet_d_bottleneck": (
            "timm",
            lambda: TimmResNet(TimmBottleneck, one, stem_type="deep", stem_width=32, avg_down=True),
            dict(stem="deep", avg_down=True, shortcut="B"),
        ),
        "seresnet": (
            "timm",
            lambda: TimmResNet(TimmBottleneck, [2, 1, 1, 1], block_args=dict(attn_layer="se")),
            dict(se=True),
        ),
        "seresnext": (
            "timm",
            lambda: TimmResNet(
                TimmBottleneck, one, cardinality=32, base_width=4, block_args=dict(attn_layer="se")
            ),
            dict(se=True, groups=32, base_width=4),
        ),
        "resnetv2": (
            "timm",
            lambda: ResNetV2(
                layers=[1, 2, 1, 1], conv_layer=create_conv2d, norm_layer=BatchNormAct2d
            ),
            dict(preact=True, stage_sizes=(1, 2, 1, 1)),
        ),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_logits_equal_the_reference_in_both_modes(kind):
    source, build, expected = _kinds()[kind]
    torch.manual_seed(0)
    ref = randomise(build(), seed=1)
    convert = rj.weights.from_timm if source == "timm" else rj.weights.from_torchvision
    module, variables = converted = convert(ref.state_dict())
    for field, value in expected.items():
        assert getattr(module, field) == value, (field, getattr(module, field))
    assert module.variant == "v1.5"
    for i, (h, w) in enumerate(SIZES):
        check(f"{kind}", ref, converted, images((2, 3, h, w), seed=i))


@pytest.mark.parametrize("groups, width", [(32, 4), (1, 128)])
def test_to_torchvision_round_trip_of_resnext_and_wide(groups, width):
    ref = randomise(TV.ResNet(TV.Bottleneck, [1, 1, 1, 1], groups=groups, width_per_group=width))
    module, variables = rj.weights.from_torchvision(ref.state_dict())
    exported = rj.weights.to_torchvision(module, variables)
    state = ref.state_dict()
    assert list(exported) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
    back = TV.ResNet(TV.Bottleneck, [1, 1, 1, 1], groups=groups, width_per_group=width)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    check("round trip", back.eval(), (module, variables), images((1, 3, 64, 64)), train=False)


def test_timm_names_are_checked_against_the_tensors():
    ref = TimmResNet(TimmBottleneck, [3, 4, 6, 3], stem_type="deep", stem_width=32, avg_down=True)
    module, _ = rj.weights.from_timm(ref.state_dict(), "resnet50d")
    assert module.stage_sizes == (3, 4, 6, 3) and module.stem == "deep"
    with pytest.raises(ValueError, match=r"tensor conv1\.weight is missing"):
        rj.weights.from_timm(ref.state_dict(), "seresnet50")  # its stem is one 7x7
    se = TimmResNet(TimmBottleneck, [3, 4, 6, 3], block_args=dict(attn_layer="se"))
    assert rj.weights.from_timm(se.state_dict(), "seresnet50")[0].se
    with pytest.raises(ValueError, match=r"layer1\.0\.se\.fc1\.weight .*has no place in resnet50"):
        rj.weights.from_timm(se.state_dict(), "resnet50")
    with pytest.raises(ValueError, match="not one of the networks"):
        rj.weights.from_timm(ref.state_dict(), "resnet50x")


def test_unsupported_layouts_are_refused_naming_the_tensor():
    bit = ResNetV2(layers=[1, 1, 1, 1], conv_layer=create_conv2d, norm_layer=GroupNormAct)
    with pytest.raises(ValueError, match=r"norm\.weight has no running statistics .*GroupNorm"):
        rj.weights.from_timm(bit.state_dict())
    resnest = timm.create_model("resnest14d", pretrained=False)
    with pytest.raises(ValueError, match=r"split-attention block \(ResNeSt\)"):
        rj.weights.from_timm(resnest.state_dict())
    eca = timm.create_model("ecaresnet26t", pretrained=False)
    with pytest.raises(ValueError, match="attention block other than timm's SE"):
        rj.weights.from_timm(eca.state_dict())
    with pytest.raises(ValueError, match=r"SE modules .*not a torchvision architecture"):
        rj.weights.to_torchvision(
            *rj.weights.from_timm(randomise(_kinds()["seresnet"][1]()).state_dict())
        )
