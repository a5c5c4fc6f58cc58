"""Exported files, run in their own runtimes, against the JAX model (issue 23)."""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: F401  (before TensorFlow, see tests/conftest.py)
import torchvision

import resnet_jax as rj
from resnet_jax import export as ex
from resnet_jax.errors import UserError

BATCHES = (1, 3)
RTOL = 1e-4  # of the largest logit


def _randomised(module, size):
    """Variables with BatchNorm statistics and affine terms away from their
    initial values, so that a wrong fold of BatchNorm shows. Drawn in numpy on
    the shapes of ``jax.eval_shape`` (kernels normal with variance 1/fan-in):
    nothing is compiled, which keeps ResNet-50's init out of every test."""
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    rs = np.random.RandomState(0)
    for k, a in flat.items():
        if k[-1] == "kernel":
            value = rs.normal(0, 1 / np.sqrt(np.prod(a.shape[:-1])), a.shape)
        elif k[-1] == "mean" or k[-1] == "bias":
            value = rs.normal(0, 0.1, a.shape)
        elif k[-1] in ("var", "scale"):
            value = rs.uniform(0.5, 1.5, a.shape)
        else:
            raise AssertionError(f"no random value for the variable {k}")
        flat[k] = value.astype(a.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def _images(batch, size, dtype=np.float32):
    rs = np.random.RandomState(batch)
    if dtype == np.uint8:
        return rs.randint(0, 256, (batch, size, size, 3)).astype(np.uint8)
    return rs.normal(size=(batch, size, size, 3)).astype(np.float32)


def _close(got, ref):
    err = np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref))
    assert err < RTOL, err


def run_file(path, fmt, x):
    """The file's logits on ``x``, in the format's own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {"images": x})[0]
    if fmt == "stablehlo":
        with open(path, "rb") as f:
            return np.asarray(jax.export.deserialize(f.read()).call(x))
    if fmt == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        return loaded.signatures["serving_default"](images=tf.constant(x))["logits"].numpy()
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _jax_logits(module, variables, x):
    return np.asarray(module.apply(variables, x, train=False))


def _export(tmp_path, module, variables, fmt, size, **kw):
    path = str(tmp_path / ("model" + ex.SUFFIXES[fmt]))
    ex.export(module, variables, path, fmt, image_shape=(size, size, 3), **kw)
    return path


# Every kind of network of the library, in every format. ResNet-20 and
# ResNet-18 are in every format below (option A; converted from torchvision),
# so they are checked here in ONNX only, the writer that is this project's own.
KINDS = {
    "resnet20": {},  # option-A shortcuts (strided slices, channel pads)
    "resnet18": {},
    "resnet50": {},  # v1
    "resnet50_v1.5": {"variant": "v1.5"},
    "resnetv2_50": {},  # pre-activation
    "resnet50d": {},  # deep stem, average-pool shortcuts (ceil mode)
    "resnext50_32x4d": {},  # grouped convolutions
    "wrn16_8": {},  # wide, pre-activation
    "seresnet50": {},  # squeeze-and-excitation
}
ELSEWHERE = ("resnet20", "resnet18", "resnet50_v1.5")  # every format, in the tests below
KIND_FORMATS = [
    (k, f) for k in sorted(KINDS) for f in ex.FORMATS if f == "onnx" or k not in ELSEWHERE
]
SIZE = 32  # the ImageNet nets too: small inputs keep the suite fast


@functools.cache
def _network(kind):
    """``(module, variables, {batch: (images, JAX logits)})`` of one kind, made
    once per test process and shared by its formats.

    The 50-layer kinds are built at half width with two blocks a stage: the
    same blocks, shortcuts, groups and squeeze-excitation as the full
    networks, with about a seventh of their weights. Full-size ResNet-50 and
    ResNet-18 are exported in every format by
    ``test_every_format_equals_jax_and_torch``."""
    module = rj.create_model(kind.split("_v1")[0], num_classes=10, **KINDS[kind])
    if "50" in kind:
        module = module.clone(stage_sizes=(2, 2, 2, 2), widths=tuple(w // 2 for w in module.widths))
    variables = _randomised(module, SIZE)
    return module, variables, _references(module, variables, SIZE)


def _references(module, variables, size):
    """``{batch: (images, JAX logits)}`` for each of BATCHES: the smaller
    batches are the first images of the largest, so the JAX model compiles
    once."""
    x = _images(max(BATCHES), size)
    logits = np.asarray(jax.jit(functools.partial(module.apply, train=False))(variables, x))
    return {b: (x[:b], logits[:b]) for b in BATCHES}


@pytest.mark.parametrize("kind,fmt", KIND_FORMATS)
def test_every_kind_of_network_in_every_format(kind, fmt, tmp_path):
    module, variables, refs = _network(kind)
    path = _export(tmp_path, module, variables, fmt, SIZE)
    for x, ref in refs.values():
        _close(run_file(path, fmt, x), ref)


def test_onnx_folds_batchnorm_and_keeps_nchw():
    import onnx

    module = rj.create_model("resnet18", num_classes=10)
    data = ex.onnx_bytes(
        ex.serving_function(module, _randomised(module, 64)), (64, 64, 3)
    )  # fmt: skip
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert ops.count("Conv") == 20
    assert "Sub" not in ops and "Mul" not in ops  # the 20 BatchNorms are in the Conv weights
    assert ops.count("Transpose") == 1  # the NHWC input, once


TORCHVISION = {"resnet18": 64, "resnet50": 32}  # architecture: image size


@pytest.fixture(scope="module", params=sorted(TORCHVISION))
def torchvision_net(request):
    """A torchvision network with BatchNorm statistics away from their initial values."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, request.param)(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    size = TORCHVISION[request.param]
    module, variables = rj.weights.from_torchvision(model.state_dict())
    refs = []
    for x, logits in _references(module, variables, size).values():
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        refs.append((x, logits, torch_logits))
    return module, variables, size, refs


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_every_format_equals_jax_and_torch(fmt, torchvision_net, tmp_path):
    """A torchvision-converted ResNet-18 and ResNet-50: the file equals the JAX model and torch."""
    module, variables, size, refs = torchvision_net
    path = _export(tmp_path, module, variables, fmt, size)
    for x, ref, torch_logits in refs:
        got = run_file(path, fmt, x)
        _close(got, ref)
        _close(got, torch_logits)


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_option_a_cifar_net_in_every_format(fmt, tmp_path):
    module = rj.create_model("resnet20", num_classes=10)
    variables = _randomised(module, 32)
    path = _export(tmp_path, module, variables, fmt, 32)
    for b in BATCHES:
        x = _images(b, 32)
        _close(run_file(path, fmt, x), _jax_logits(module, variables, x))


@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_uint8_input_folds_the_normalisation(fmt, tmp_path):
    module = rj.create_model("resnet18", num_classes=10)
    variables = _randomised(module, 64)
    mean, std = rj.weights.IMAGENET_MEAN, rj.weights.IMAGENET_STD
    path = _export(tmp_path, module, variables, fmt, 64, uint8=True, mean=mean, std=std)
    x = _images(2, 64, np.uint8)
    normalised = (x.astype(np.float32) / 255 - np.asarray(mean)) / np.asarray(std)
    ref = np.asarray(module.apply(variables, normalised.astype(np.float32), train=False))
    _close(run_file(path, fmt, x), ref)


def test_fixed_batch_and_bfloat16_network(tmp_path):
    import onnx

    module = rj.create_model("resnet20", num_classes=10, dtype=jnp.bfloat16)
    variables = _randomised(module, 32)
    path = _export(tmp_path, module, variables, "onnx", 32, batch_size=4)
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 32, 32, 3]
    x = _images(4, 32)
    f32 = module.clone(dtype=jnp.float32)  # exported in float32 by default
    _close(run_file(path, "onnx", x), np.asarray(f32.apply(variables, x, train=False)))
    with pytest.raises(UserError, match="float32"):
        _export(tmp_path, module, variables, "onnx", 32, dtype="bfloat16")


def test_an_existing_file_is_kept_without_force(tmp_path):
    module = rj.create_model("resnet8", num_classes=10)
    variables = _randomised(module, 32)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(UserError, match="exists; give --force"):
        ex.export(module, variables, str(path), "onnx", image_shape=(32, 32, 3))
    assert path.read_bytes() == b"mine"
    ex.export(module, variables, str(path), "onnx", image_shape=(32, 32, 3), force=True)
    assert path.read_bytes() != b"mine"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temporary left behind


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    module = rj.create_model("resnet8", num_classes=10)
    variables = _randomised(module, 32)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"mine")
    from resnet_jax.export import onnx_graph

    def broken(*a, **k):
        raise onnx_graph.UnsupportedError("the primitive 'gather' has no ONNX translation here")

    monkeypatch.setattr(onnx_graph, "jaxpr_to_onnx", broken)
    with pytest.raises(UserError, match="cannot be written as ONNX here: the primitive 'gather'"):
        ex.export(module, variables, str(path), "onnx", image_shape=(32, 32, 3), force=True)
    assert path.read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
