"""rj.weights' PyTorch converters against the real reference modules (random weights).

torchvision, timm and transformers modules are built with random weights and
randomised BatchNorm statistics and affine terms (no download), converted, and
compared: logits within 1e-4 (relative to the largest) in inference mode and
1e-3 in training mode (batch statistics). Run with ``-s`` to see the errors.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import resnet_jax as rj

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
F = torch.nn.functional

EVAL_TOL, TRAIN_TOL = 1e-4, 1e-3
ODD = (65, 81)  # odd sizes: every stride-2 layer sees an odd input somewhere

# Parameter counts of torchvision's models (its documentation's figures).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
STAGE_SIZES = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
}


def randomise(model, seed=0):
    """Non-trivial BatchNorm statistics and affine terms, and classifier biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, torch.nn.Linear):
                m.bias.normal_(0.0, 0.1, generator=g)
    return model.eval()


def images(shape, seed=0):
    """NCHW float32 inputs for torch; ``.transpose(0, 2, 3, 1)`` for resnet_jax."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_out(model, x):
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    out = getattr(out, "logits", out)  # transformers returns an output record
    return out.numpy()


def check(label, model, converted, x, *, train=True, output=torch_out):
    """Compares inference (then training) outputs; returns the errors."""
    module, variables = converted
    model.eval()
    err = rel_err(module.apply(variables, x.transpose(0, 2, 3, 1)), output(model, x))
    print(f"\n{label} eval {x.shape[2]}x{x.shape[3]}: {err:.1e}", end="")
    assert err < EVAL_TOL, (label, err)
    if not train:
        return err, None
    # Training mode uses batch statistics and updates the running ones: keep them.
    stats = {k: v.clone() for k, v in model.state_dict().items() if ".running_" in k}
    model.train()
    ref = output(model, x)
    model.eval().load_state_dict(stats, strict=False)
    out, _ = module.apply(variables, x.transpose(0, 2, 3, 1), train=True, mutable=["batch_stats"])
    err_t = rel_err(out, ref)
    print(f"\n{label} train {x.shape[2]}x{x.shape[3]}: {err_t:.1e}", end="")
    assert err_t < TRAIN_TOL, (label, err_t)
    return err, err_t


def n_params(variables):
    return sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))


# --------------------------------------------------------------------------- #
# torchvision
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", list(STAGE_SIZES))
def test_torchvision_every_depth(name):
    ref = randomise(getattr(torchvision.models, name)())
    converted = rj.weights.from_torchvision(ref.state_dict())
    module, variables = converted
    assert module.stage_sizes == STAGE_SIZES[name] and module.variant == "v1.5"
    assert module.bn_epsilon == 1e-5 and module.bn_momentum == pytest.approx(0.9)
    assert n_params(variables) == TORCHVISION_PARAMS[name]
    assert converted.preprocessing == rj.weights.PREPROCESSING["torchvision"]
    check(f"torchvision {name}", ref, converted, images((2, 3, *ODD), seed=1))
    if name == "resnet152":  # 224x224 once for the deepest net; 18 and 50 below
        check(f"torchvision {name}", ref, converted, images((1, 3, 224, 224), 2), train=False)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_224_and_running_statistics(name):
    ref = randomise(getattr(torchvision.models, name)(), seed=3)
    module, variables = rj.weights.from_torchvision(ref.state_dict(), name=name)
    x = images((2, 3, 224, 224), seed=4)
    check(f"torchvision {name}", ref, (module, variables), x)
    # One training step: torch's momentum 0.1 is ours 0.9; torch updates the
    # running variance with the unbiased batch variance, flax with the biased one.
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.train()
    with torch.no_grad():
        ref(torch.from_numpy(x))
    ref.eval()
    _, updates = module.apply(
        variables, x.transpose(0, 2, 3, 1), train=True, mutable=["batch_stats"]
    )
    stem = updates["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(stem["mean"], ref.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    n = 2 * 112 * 112  # values per channel at the stem BatchNorm
    biased = (np.asarray(stem["var"]) - 0.9 * before["bn1.running_var"].numpy()) / 0.1
    torch_var = 0.9 * before["bn1.running_var"].numpy() + 0.1 * biased * n / (n - 1)
    np.testing.assert_allclose(torch_var, ref.bn1.running_var.numpy(), rtol=1e-4)


def test_torchvision_from_files_and_checkpoints(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    ref = randomise(torchvision.models.resnet18(num_classes=10), seed=6)
    sd = ref.state_dict()
    save_file(sd, tmp_path / "r18.safetensors")
    # A training checkpoint of a DataParallel model, as many scripts save it.
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "c.pth")
    x = images((2, 3, *ODD), seed=7)
    for source in (tmp_path / "r18.safetensors", str(tmp_path / "c.pth"), ref):
        converted = rj.weights.from_torchvision(source)
        assert converted.module.num_classes == 10
        check("torchvision resnet18 (file)", ref, converted, x, train=False)
    # The variables are copies: changing the torch model later leaves them alone.
    stem_mean = converted.variables["batch_stats"]["stem_bn"]["mean"].copy()
    with torch.no_grad():
        ref.bn1.running_mean.add_(1.0)
        ref.conv1.weight.zero_()
    assert np.array_equal(converted.variables["batch_stats"]["stem_bn"]["mean"], stem_mean)
    assert np.abs(converted.variables["params"]["stem_conv"]["kernel"]).min() > 0
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        rj.weights.from_torchvision(str(tmp_path / "r18.npz"))


def test_classifier_dropped_or_checked():
    ref = randomise(torchvision.models.resnet18(), seed=8)
    module, variables = rj.weights.from_torchvision(ref.state_dict(), num_classes=0)
    assert module.num_classes == 0 and "head" not in variables["params"]
    x = images((2, 3, *ODD), seed=9)
    ref.fc = torch.nn.Identity()  # torchvision's pooled features
    check("torchvision resnet18 headless", ref, (module, variables), x, train=False)
    with pytest.raises(ValueError, match=r"num_classes=10.*1000-class classifier.*fc\.weight"):
        rj.weights.from_torchvision(
            randomise(torchvision.models.resnet18()).state_dict(), num_classes=10
        )


def test_options_reach_the_module():
    sd = torchvision.models.resnet18().state_dict()
    module, _ = rj.weights.from_torchvision(sd, bn_groups=2, bn_momentum=0.99)
    assert module.bn_groups == 2 and module.bn_momentum == 0.99
    with pytest.raises(ValueError, match="Unknown option.*'variant'"):
        rj.weights.from_torchvision(sd, variant="v1")


# --------------------------------------------------------------------------- #
# timm
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["resnet50", "resnet26"])
def test_timm(name):
    timm = pytest.importorskip("timm")
    ref = randomise(timm.create_model(name, pretrained=False), seed=10)
    converted = rj.weights.from_torchvision(ref.state_dict())
    if name == "resnet26":  # not a torchvision depth: read off the tensors
        assert converted.module.stage_sizes == (2, 2, 2, 2)
    check(f"timm {name}", ref, converted, images((2, 3, *ODD), seed=11))
    if name == "resnet50":
        check(f"timm {name}", ref, converted, images((1, 3, 224, 224), 12), train=False)


def test_timm_headless_model():
    timm = pytest.importorskip("timm")
    ref = randomise(timm.create_model("resnet18", pretrained=False, num_classes=0), seed=13)
    converted = rj.weights.from_torchvision(ref.state_dict())
    assert converted.module.num_classes == 0
    check("timm resnet18 headless", ref, converted, images((2, 3, *ODD), 14))


# --------------------------------------------------------------------------- #
# Hugging Face transformers
# --------------------------------------------------------------------------- #

HF_CONFIGS = {
    "resnet-18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "resnet-34": dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512]),
    "resnet-50": dict(depths=[3, 4, 6, 3]),
    "resnet-101": dict(depths=[3, 4, 23, 3]),
    "resnet-152": dict(depths=[3, 8, 36, 3]),
}


def hf_model(name, seed=0, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(**{**HF_CONFIGS.get(name, {}), **config})
    return randomise(transformers.ResNetForImageClassification(config), seed=seed)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_every_depth(name):
    ref = hf_model(name, seed=15, num_labels=1000)
    converted = rj.weights.from_transformers(ref)  # the model object: its config is used
    module, variables = converted
    tv = name.replace("-", "")
    assert module.stage_sizes == STAGE_SIZES[tv] and module.variant == "v1.5"
    assert n_params(variables) == TORCHVISION_PARAMS[tv]  # the same network
    assert converted.preprocessing == rj.weights.PREPROCESSING["huggingface"]
    check(f"transformers {name}", ref, converted, images((2, 3, *ODD), 16))
    if name in ("resnet-18", "resnet-50"):
        check(f"transformers {name}", ref, converted, images((2, 3, 224, 224), 17))


def test_transformers_directory_and_backbone(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = hf_model("resnet-18", seed=18, num_labels=7)
    ref.save_pretrained(tmp_path)  # config.json + model.safetensors
    transformers.ConvNextImageProcessor(
        size={"shortest_edge": 224},
        crop_pct=0.875,
        resample=3,
        image_mean=rj.weights.IMAGENET_MEAN,
        image_std=rj.weights.IMAGENET_STD,
    ).save_pretrained(tmp_path)  # microsoft/resnet-*'s recipe
    converted = rj.weights.from_transformers(tmp_path)
    assert converted.module.num_classes == 7
    assert converted.preprocessing == rj.weights.PREPROCESSING["huggingface"]
    x = images((2, 3, *ODD), 19)
    check("transformers resnet-18 (directory)", ref, converted, x, train=False)
    # ResNetModel: no classifier, pooled features.
    backbone = ref.resnet
    module, variables = rj.weights.from_transformers(backbone.state_dict())
    assert module.num_classes == 0

    def pooled(model, x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).pooler_output.flatten(1).numpy()

    check("transformers ResNetModel", backbone, (module, variables), x, output=pooled)


def test_transformers_downsample_in_bottleneck_is_v1():
    ref = hf_model("tiny", seed=20, depths=[1, 2, 1, 1], downsample_in_bottleneck=True)
    converted = rj.weights.from_transformers(ref.state_dict(), config=ref.config)
    assert converted.module.variant == "v1" and converted.module.stage_sizes == (1, 2, 1, 1)
    check("transformers v1 bottleneck", ref, converted, images((2, 3, *ODD), 21))


def test_transformers_refusals():
    ref = hf_model("tiny", seed=22, depths=[1, 1, 1, 1])
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="downsample_in_first_stage=True"):
        rj.weights.from_transformers(sd, config={"downsample_in_first_stage": True})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        rj.weights.from_transformers(sd, config={"hidden_act": "gelu"})
    missing = {
        k: v
        for k, v in sd.items()
        if k != "resnet.encoder.stages.2.layers.0.layer.1.normalization.running_var"
    }
    with pytest.raises(
        ValueError,
        match=r"tensor resnet\.encoder\.stages\.2\.layers\.0\.layer\.1\.normalization\.running_var is missing",
    ):
        rj.weights.from_transformers(missing)
    with pytest.raises(ValueError, match=r"tensor resnet\.pooler\.weight has no place"):
        rj.weights.from_transformers({**sd, "resnet.pooler.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="use rj.weights.from_torchvision"):
        rj.weights.from_transformers(torchvision.models.resnet18().state_dict())
    with pytest.raises(ValueError, match="use rj.weights.from_transformers"):
        rj.weights.from_torchvision(sd)


# --------------------------------------------------------------------------- #
# CIFAR ResNets as akamaster/pytorch_resnet_cifar10 saves them (option A)
# --------------------------------------------------------------------------- #


class CifarBlock(torch.nn.Module):
    """akamaster's BasicBlock. Where the shape changes, option A subsamples and
    zero-pads (no parameters); option B projects with ``shortcut.0/1``."""

    def __init__(self, in_planes, planes, stride=1, option="A"):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.pad = (stride != 1 or in_planes != planes) and option == "A"
        self.planes = planes
        self.shortcut = torch.nn.Sequential()
        if (stride != 1 or in_planes != planes) and option == "B":
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                torch.nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            p = self.planes // 4
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0)
        return F.relu(out + self.shortcut(x))


class CifarResNet(torch.nn.Module):
    """akamaster's ResNet: 3x3 stem of 16, stages of 16/32/64, ``linear``."""

    def __init__(self, n, num_classes=10, option="A"):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(CifarBlock(planes, width, 2 if i > 0 and j == 0 else 1, option))
                planes = width
            layers.append(torch.nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


@pytest.mark.parametrize("depth, option", [(20, "A"), (56, "A"), (20, "B")])
def test_cifar(depth, option, tmp_path):
    torch.manual_seed(depth)
    ref = randomise(CifarResNet((depth - 2) // 6, option=option), seed=depth)
    # akamaster's files: {'state_dict': ..., 'best_prec1': ...} of a DataParallel model.
    path = tmp_path / f"resnet{depth}.th"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "best_prec1": 91.0},
        path,
    )
    converted = rj.weights.from_torchvision(path, name=f"resnet{depth}")
    module = converted.module
    assert (module.stem, module.shortcut, module.widths) == ("cifar", option, (16, 32, 64))
    assert converted.preprocessing == rj.weights.PREPROCESSING["cifar"]
    inferred = rj.weights.from_torchvision(ref.state_dict())  # the same without the name
    assert inferred.module == module
    label = f"cifar resnet{depth} option {option}"
    check(label, ref, converted, images((4, 3, 32, 32), depth))
    check(label, ref, converted, images((2, 3, 33, 33), depth + 1))
    other, why = ("resnet26", "is missing") if depth == 20 else ("resnet20", "has no place")
    with pytest.raises(ValueError, match=rf"tensor layer1\.3\.conv1\.weight.* {why}[. ]"):
        rj.weights.from_torchvision(ref.state_dict(), name=other)


# --------------------------------------------------------------------------- #
# Without torch: .safetensors read with numpy; .pth refused with a message
# --------------------------------------------------------------------------- #

_WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import numpy as np

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("No module named 'torch' (blocked by the test)")

    sys.meta_path.insert(0, NoTorch())
    import resnet_jax as rj

    folder = sys.argv[1]
    x = np.load(folder + "/x.npy").transpose(0, 2, 3, 1)
    for name, source, convert in [
        ("torchvision", folder + "/r18.safetensors", rj.weights.from_torchvision),
        ("transformers", folder + "/hf", rj.weights.from_transformers),
    ]:
        module, variables = convert(source)
        np.save(f"{folder}/{name}_out.npy", np.asarray(module.apply(variables, x)))
    try:
        rj.weights.from_torchvision(folder + "/r18.pth")
        message = None
    except ImportError as e:
        message = str(e)
    print(json.dumps({"torch_imported": "torch" in sys.modules, "pth_error": message}))
    """
)


def test_safetensors_without_torch(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    ref = randomise(torchvision.models.resnet18(), seed=30)
    save_file(ref.state_dict(), tmp_path / "r18.safetensors")
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    hf = hf_model("resnet-18", seed=31, num_labels=5)
    hf.save_pretrained(tmp_path / "hf")
    x = images((2, 3, *ODD), 32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "without_torch.py"
    script.write_text(_WITHOUT_TORCH)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["torch_imported"] is False
    assert "needs torch" in report["pth_error"] and ".safetensors" in report["pth_error"]
    for name, model in [("torchvision", ref), ("transformers", hf)]:
        err = rel_err(np.load(tmp_path / f"{name}_out.npy"), torch_out(model, x))
        print(f"\n{name} without torch eval: {err:.1e}", end="")
        assert err < EVAL_TOL


# --------------------------------------------------------------------------- #
# Export: to_torchvision
# --------------------------------------------------------------------------- #


def random_variables(module, seed):
    """Variables as if trained here: random parameters and BatchNorm statistics.

    Drawn with numpy into the shapes of ``module.init`` (nothing is compiled).
    """
    shapes = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    )
    rng = np.random.default_rng(seed)

    def draw(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        if leaf == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        if leaf == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.normal(0.0, 0.2, s.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_to_torchvision_round_trip(name, tmp_path):
    module = rj.create_model(name, variant="v1.5")
    variables = random_variables(module, seed=40)
    sd = rj.weights.to_torchvision(module, variables)
    ref = getattr(torchvision.models, name)()
    assert list(sd) == list(ref.state_dict())  # names and torchvision's order
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})  # strict
    check(f"to_torchvision {name}", ref, (module, variables), images((2, 3, *ODD), 41))
    # Back again: bit for bit, both ways.
    module2, variables2 = rj.weights.from_torchvision(sd)
    assert module2 == module
    flat = jax.tree_util.tree_leaves_with_path(variables)
    flat2 = dict(jax.tree_util.tree_leaves_with_path(variables2))
    assert len(flat) == len(flat2)
    for path, leaf in flat:
        assert np.array_equal(np.asarray(leaf), flat2[path]), path
    sd2 = rj.weights.to_torchvision(module2, variables2)
    assert all(np.array_equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    # The torch-less path: numpy -> safetensors -> torch.
    safetensors = pytest.importorskip("safetensors")
    del safetensors
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    save_file(sd, tmp_path / "export.safetensors")
    ref.load_state_dict(load_file(tmp_path / "export.safetensors"))


def test_to_torchvision_of_a_converted_torchvision_model_is_exact():
    ref = randomise(torchvision.models.resnet34(), seed=42)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    back = rj.weights.to_torchvision(*rj.weights.from_torchvision(sd))
    assert list(back) == list(sd)
    for k in sd:
        if not k.endswith("num_batches_tracked"):
            assert np.array_equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype, k


def test_to_torchvision_refuses_what_torchvision_cannot_compute():
    v1 = rj.create_model("resnet50")  # the paper's v1 bottleneck
    cifar = rj.create_model("resnet20")
    with pytest.raises(ValueError, match="variant 'v1' bottlenecks"):
        rj.weights.to_torchvision(v1, {"params": {}})
    with pytest.raises(ValueError, match="stem 'cifar'.*shortcut 'A'"):
        rj.weights.to_torchvision(cifar, {"params": {}})
    eps = rj.create_model("resnet18", bn_epsilon=1e-3)
    with pytest.raises(ValueError, match="epsilon 0.001"):
        rj.weights.to_torchvision(eps, {"params": {}})
    r18, r34 = rj.create_model("resnet18"), rj.create_model("resnet34")
    with pytest.raises(ValueError, match="variables lack batch_stats/stage1_block3/bn1/mean"):
        rj.weights.to_torchvision(r34, random_variables(r18, seed=43))
    with pytest.raises(ValueError, match=r"head/bias has shape \(10,\).*\(1000,\)"):
        rj.weights.to_torchvision(
            r18, random_variables(rj.create_model("resnet18", num_classes=10), 44)
        )


# --------------------------------------------------------------------------- #
# Refusals: every message names the tensor
# --------------------------------------------------------------------------- #


def _timm_sd(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kw).state_dict()


@pytest.mark.parametrize(
    "make, fields",
    [
        (lambda: _timm_sd("resnet18d"), dict(stem="deep", avg_down=True)),
        (lambda: _timm_sd("resnet18", avg_down=True), dict(stem="imagenet", avg_down=True)),
        (lambda: torchvision.models.resnext50_32x4d().state_dict(), dict(groups=32, base_width=4)),
        (lambda: _timm_sd("seresnet18"), dict(se=True)),
        (lambda: torchvision.models.wide_resnet50_2().state_dict(), dict(base_width=128)),
    ],
    ids=["resnet-d-stem", "resnet-d-downsample", "resnext", "se", "wide"],
)
def test_the_layouts_once_refused_now_convert(make, fields):
    """Refused before the model family issue; now read off the tensors, every
    tensor placed (the logits are compared in test_family_weights.py)."""
    state = make()
    module, variables = rj.weights.from_torchvision(state)
    for field, value in fields.items():
        assert getattr(module, field) == value, field
    n_source = sum(
        v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k
    )
    assert n_params(variables) == n_source


def test_missing_extra_and_misshapen_tensors_are_refused():
    sd = torchvision.models.resnet18().state_dict()
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(ValueError, match=r"tensor layer3\.1\.bn2\.running_var is missing"):
        rj.weights.from_torchvision(missing)
    with pytest.raises(ValueError, match=r"tensor fc2\.weight has no place in the network"):
        rj.weights.from_torchvision({**sd, "fc2.weight": torch.zeros(2, 2)})
    bad = {**sd, "layer2.0.conv2.weight": torch.zeros(128, 128, 5, 5)}
    with pytest.raises(
        ValueError,
        match=r"tensor layer2\.0\.conv2\.weight has shape \(128, 128, 5, 5\).*\(128, 128, 3, 3\)",
    ):
        rj.weights.from_torchvision(bad)
    with pytest.raises(ValueError, match=r"tensor layer1\.2\.conv1\.weight is missing"):
        rj.weights.from_torchvision(sd, name="resnet34")
    with pytest.raises(ValueError, match=r"tensor conv1\.weight is missing"):
        rj.weights.from_torchvision({"weight": torch.zeros(3)})
    with pytest.raises(TypeError, match="state dict"):
        rj.weights.from_torchvision(42)


# --------------------------------------------------------------------------- #
# Preprocessing: the recipes of the sources, applied in jax.numpy
# --------------------------------------------------------------------------- #


def photo(h=300, w=411, seed=50):
    """A smooth uint8 RGB image (HWC), like a photograph more than like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 40.0
    img = np.stack([np.sin(yy + c) * np.cos(xx * (c + 1) / 2) for c in range(3)], -1)
    return np.clip(127.5 + 100 * img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def test_preprocess_matches_torchvision_weight_transforms():
    img = photo()
    for preset, weights in [
        ("torchvision", torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
        ("torchvision-v2", torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    ]:
        ref = weights.transforms()(torch.from_numpy(img).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        out = np.asarray(rj.weights.preprocess(img, preset))
        assert out.shape == ref.shape == (224, 224, 3)
        # One grey level is 1 / (255 * 0.225) ~ 0.017 after normalising.
        diff = np.abs(out - ref)
        print(f"\npreprocess {preset}: max {diff.max():.3f}, mean {diff.mean():.4f}", end="")
        assert diff.mean() < 0.01 and diff.max() < 0.05


def test_preprocess_matches_timm_and_transformers():
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    img = photo(seed=51)
    cfg = timm.create_model("resnet50.a1_in1k", pretrained=False).pretrained_cfg
    record = rj.weights.Preprocessing.from_timm(cfg)
    assert (record.resize, record.crop, record.interpolation) == (235, 224, "bicubic")
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=cfg))
    ref = tf(Image.fromarray(img)).permute(1, 2, 0).numpy()
    diff = np.abs(np.asarray(rj.weights.preprocess(img[None], record))[0] - ref)
    print(f"\npreprocess timm a1_in1k: max {diff.max():.3f}, mean {diff.mean():.4f}", end="")
    assert diff.mean() < 0.01 and diff.max() < 0.05

    processor = transformers.ConvNextImageProcessor(
        size={"shortest_edge": 224},
        crop_pct=0.875,
        resample=3,
        image_mean=rj.weights.IMAGENET_MEAN,
        image_std=rj.weights.IMAGENET_STD,
    )
    ref = processor(Image.fromarray(img), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    diff = np.abs(np.asarray(rj.weights.preprocess(img, "huggingface")) - ref)
    print(f"\npreprocess huggingface: max {diff.max():.3f}, mean {diff.mean():.4f}", end="")
    assert diff.mean() < 0.01 and diff.max() < 0.05


def test_preprocessing_records_validate_and_crop():
    with pytest.raises(ValueError, match="interpolation"):
        rj.weights.Preprocessing(interpolation="lanczos")
    with pytest.raises(ValueError, match="Unknown preprocessing"):
        rj.weights.preprocess(np.zeros((8, 8, 3), np.uint8), "imagenet")
    with pytest.raises(ValueError, match="smaller than the 224-pixel crop"):
        rj.weights.preprocess(
            np.zeros((1, 100, 100, 3), np.uint8),
            dataclasses.replace(rj.weights.PREPROCESSING["torchvision"], resize=None),
        )
    out = rj.weights.preprocess(np.full((2, 32, 32, 3), 255, np.uint8), "cifar")
    np.testing.assert_allclose(
        out[0, 0, 0], (1 - np.array(rj.weights.IMAGENET_MEAN)) / rj.weights.IMAGENET_STD, rtol=1e-6
    )
