"""The model library through its public API: counts, shapes, modes, errors."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import resnet_jax as rj


def abstract_variables(model, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def count(model, shape):
    return n_params(abstract_variables(model, shape)["params"])


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# torchvision.models.resnetXX(): sum(p.numel() for p in m.parameters())
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
@pytest.mark.parametrize("variant", ["v1", "v1.5"])
def test_imagenet_param_counts_match_torchvision(name, variant):
    v = abstract_variables(rj.create_model(name, variant=variant), (1, 224, 224, 3))
    assert set(v) == {"params", "batch_stats"}
    assert n_params(v["params"]) == TORCHVISION_PARAMS[name]


# Table 6 of the paper, "# params" column, in millions as printed.
PAPER_TABLE6 = {20: "0.27", 32: "0.46", 44: "0.66", 56: "0.85", 110: "1.7", 1202: "19.4"}


@pytest.mark.parametrize("depth", sorted(PAPER_TABLE6))
def test_cifar_param_counts_match_paper_table6(depth):
    v = abstract_variables(rj.create_model(f"resnet{depth}"), (1, 32, 32, 3))
    count = n_params(v["params"])
    digits = len(PAPER_TABLE6[depth].split(".")[1])
    assert f"{count / 1e6:.{digits}f}" == PAPER_TABLE6[depth]
    if depth == 20:
        assert count == 269_722


def test_plain_nets_have_the_same_params_as_option_a_and_b_on_imagenet():
    # Option A is parameter-free, so plainN and resnetN (A) have equal counts;
    # the paper's Sec. 4.1 relies on this ("no extra parameter").
    for depth in (20, 56):
        a = count(rj.create_model(f"resnet{depth}"), (1, 32, 32, 3))
        p = count(rj.create_model(f"plain{depth}"), (1, 32, 32, 3))
        assert a == p
    shape = (1, 224, 224, 3)
    p34 = count(rj.create_model("plain34"), shape)
    a34 = count(rj.create_model("resnet34", shortcut="A"), shape)
    b34 = count(rj.create_model("resnet34", shortcut="B"), shape)
    c34 = count(rj.create_model("resnet34", shortcut="C"), shape)
    assert p34 == a34 < b34 < c34
    assert b34 == TORCHVISION_PARAMS["resnet34"]


# Table 1 of the paper, "FLOPs" row (multiply-adds), x 10^9.
PAPER_TABLE1_GMACS = {
    "resnet18": 1.8,
    "resnet34": 3.6,
    "resnet50": 3.8,
    "resnet101": 7.6,
    "resnet152": 11.3,
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE1_GMACS))
def test_macs_match_paper_table1(name):
    macs = rj.count_macs(rj.create_model(name), (1, 224, 224, 3))
    assert macs / 1e9 == pytest.approx(PAPER_TABLE1_GMACS[name], rel=0.03)


def test_macs_count_padding_taps_and_v15_costs_more():
    v1 = rj.count_macs(rj.create_model("resnet50"))
    v15 = rj.count_macs(rj.create_model("resnet50", variant="v1.5"))
    assert 1.04 < v15 / v1 < 1.08
    # A 3x3 conv on 4x4 with padding 1: 16 outputs x 9 taps, although only 100
    # of those 144 taps fall on real pixels.
    assert rj.count_macs(OneConv(), (1, 4, 4, 1)) == 16 * 9


class OneConv(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)


def test_list_models_and_any_cifar_depth():
    names = rj.list_models()
    for n in [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "plain18",
        "plain34",
        "resnet8",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet1202",
        "plain20",
        "plain56",
        "plain110",
    ]:
        assert n in names
    assert names == sorted(set(names), key=names.index)  # no duplicates
    m = rj.create_model("resnet26")  # 6*4 + 2
    assert m.stage_sizes == (4, 4, 4) and m.stem == "cifar" and m.shortcut == "A"
    assert rj.create_model("cifar_resnet50").stage_sizes == (8, 8, 8)
    assert rj.create_model("resnet50").stem == "imagenet"


def test_forward_shapes_and_dtypes():
    model = rj.create_model("resnet8", num_classes=7)
    x = jnp.ones((3, 32, 32, 3))
    v = model.init(jax.random.key(0), x, train=False)
    y = model.apply(v, x, train=False)
    assert y.shape == (3, 7) and y.dtype == jnp.float32
    # Any spatial size works, including odd ones.
    assert model.apply(v, jnp.ones((2, 13, 21, 3)), train=False).shape == (2, 7)


def test_train_mode_updates_batch_stats_and_eval_does_not():
    model = rj.create_model("resnet8")
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3)) * 3 + 1
    v = model.init(jax.random.key(0), x, train=False)
    y_train, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], updates["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))
    y_eval, same = model.apply(v, x, train=False, mutable=["batch_stats"])
    unchanged = jax.tree.map(
        lambda a, b: bool(jnp.all(a == b)), v["batch_stats"], same["batch_stats"]
    )
    assert all(jax.tree.leaves(unchanged))
    # Batch statistics and running statistics give different outputs.
    assert not np.allclose(y_train, y_eval)
    # Momentum 0.9: new = 0.9 * old + 0.1 * batch mean (PyTorch momentum 0.1).
    x_stem = model.apply(v, x, train=True, features=True, mutable=["batch_stats"])
    del x_stem
    kernel = v["params"]["stem_conv"]["kernel"]
    conv_out = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = 0.9 * 0.0 + 0.1 * conv_out.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(
        updates["batch_stats"]["stem_bn"]["mean"], expected, rtol=1e-4, atol=1e-5
    )


def test_shortcut_a_pads_channels_evenly_and_adds_no_params():
    sc = rj.Shortcut(32, 2, "A", conv=None, norm=None)
    x = jnp.arange(1 * 4 * 4 * 16, dtype=jnp.float32).reshape(1, 4, 4, 16) + 1
    v = sc.init(jax.random.key(0), x)
    assert v == {} or not jax.tree.leaves(v)
    y = sc.apply(v, x)
    assert y.shape == (1, 2, 2, 32)
    np.testing.assert_array_equal(y[..., :8], 0)
    np.testing.assert_array_equal(y[..., 24:], 0)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])


def test_bottleneck_stride_placement_v1_and_v15():
    for variant, conv1_hw, conv2_hw in (("v1", 8, 8), ("v1.5", 16, 8)):
        model = rj.create_model("resnet50", variant=variant)
        x = jnp.ones((1, 64, 64, 3))
        v = abstract_variables(model, x.shape)
        _, state = jax.eval_shape(
            lambda v, x, model=model: model.apply(
                v, x, capture_intermediates=True, mutable=["intermediates"]
            ),
            v,
            x,
        )
        block = state["intermediates"]["stage2_block1"]
        assert block["conv1"]["__call__"][0].shape[1] == conv1_hw
        assert block["conv2"]["__call__"][0].shape[1] == conv2_hw


def test_features_mode_and_headless_backbone():
    model = rj.create_model("resnet50", num_classes=0)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    v = abstract_variables(model, x.shape)
    assert "head" not in v["params"]
    pooled = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
    assert pooled.shape == (2, 2048) and pooled.dtype == jnp.float32
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), v, x)
    assert isinstance(feats, rj.Features)
    assert feats.stem.shape == (2, 16, 16, 64)
    assert [s.shape for s in feats.stages] == [
        (2, 16, 16, 256),
        (2, 8, 8, 512),
        (2, 4, 4, 1024),
        (2, 2, 2, 2048),
    ]
    assert feats.pooled.shape == (2, 2048) and feats.pooled.dtype == jnp.float32
    assert feats.logits is None  # no classifier
    # With a classifier the record also holds the logits, equal to the plain output.
    small = rj.create_model("resnet8")
    xs = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    vs = small.init(jax.random.key(0), xs)
    f = small.apply(vs, xs, features=True)
    np.testing.assert_array_equal(f.logits, small.apply(vs, xs))
    assert len(f.stages) == 3 and f.stages[2].shape == (2, 8, 8, 64)
    # Features keep the compute dtype; pooled features and logits stay float32.
    half = rj.create_model("resnet8", dtype=jnp.bfloat16)
    fh = jax.eval_shape(lambda v, x: half.apply(v, x, features=True), vs, xs)
    assert fh.stem.dtype == jnp.bfloat16 and {s.dtype for s in fh.stages} == {jnp.dtype("bfloat16")}
    assert fh.pooled.dtype == jnp.float32 and fh.logits.dtype == jnp.float32


def test_bfloat16_compute_float32_state_and_logits():
    model = rj.create_model("resnet8", dtype=jnp.bfloat16)
    x = jnp.ones((2, 16, 16, 3))
    v = model.init(jax.random.key(0), x)
    assert {p.dtype for p in jax.tree.leaves(v["params"])} == {jnp.dtype(jnp.float32)}
    assert {p.dtype for p in jax.tree.leaves(v["batch_stats"])} == {jnp.dtype(jnp.float32)}
    logits, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    assert {p.dtype for p in jax.tree.leaves(upd["batch_stats"])} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(v, x)
    conv_dtypes = {
        e.invars[0].aval.dtype
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name == "conv_general_dilated"
    }
    if not conv_dtypes:  # convolutions may sit inside a nested jaxpr
        conv_dtypes = {
            e.invars[0].aval.dtype
            for e in _all_eqns(jaxpr.jaxpr)
            if e.primitive.name == "conv_general_dilated"
        }
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            sub = getattr(p, "jaxpr", p)
            if hasattr(sub, "eqns"):
                yield from _all_eqns(sub)


def _train_outputs(model, x):
    v = model.init(jax.random.key(1), x)

    @jax.jit
    def run(params, stats):
        def loss(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits**2), (logits, upd)

        return jax.value_and_grad(loss, has_aux=True)(params)

    return run(v["params"], v["batch_stats"])


def test_jit_forward_backward():
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    (loss, (logits, upd)), grads = _train_outputs(rj.create_model("resnet8", num_classes=10), x)
    assert np.isfinite(loss) and logits.shape == (4, 10) and set(upd) == {"batch_stats"}
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


@pytest.mark.parametrize("name", ["resnet8", "resnet18"])
def test_materialize_changes_no_value_or_gradient(name):
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    on = _train_outputs(rj.create_model(name, num_classes=10, materialize=True), x)
    off = _train_outputs(rj.create_model(name, num_classes=10, materialize=False), x)
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.linalg.norm(jax.tree.leaves(on[1])[0])) > 0
    # NaN still reaches the loss (the trainer's non-finite guard relies on it).
    bad = _train_outputs(
        rj.create_model("resnet8", num_classes=10, materialize=True), x.at[0, 0, 0, 0].set(jnp.nan)
    )
    assert np.isnan(bad[0][0])


def test_materialize_only_on_request_and_only_in_training():
    x = jnp.ones((2, 16, 16, 3))

    def conds(model, train):
        v = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=train, mutable=["batch_stats"]))(v)
        return sum(e.primitive.name == "cond" for e in _all_eqns(jaxpr.jaxpr))

    # The default traces the same program whatever the backend: no barriers.
    default = rj.create_model("resnet8")
    assert default.materialize is False
    assert conds(default, train=True) == 0
    assert conds(default, train=False) == 0
    on = rj.create_model("resnet8", materialize=True)
    # stem + (conv1 ReLU + block output) x 3 blocks
    assert conds(on, train=True) == 7
    assert conds(on, train=False) == 0
    assert rj.materialize(jnp.arange(3.0)).tolist() == [0.0, 1.0, 2.0]


def test_init_follows_the_paper():
    model = rj.create_model("resnet20", zero_init_residual=False)
    v = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    k = v["params"]["stage3_block2"]["conv2"]["kernel"]  # 3x3x64x64
    fan_out = 3 * 3 * 64
    assert float(k.std()) == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.05)
    # He normal with fan-out (torchvision's mode): where fan-in and fan-out
    # differ (the 16 -> 32 first conv of stage 2), a fan-in init would be 41% wider.
    k = v["params"]["stage2_block1"]["conv1"]["kernel"]
    assert k.shape == (3, 3, 16, 32)
    fan_in, fan_out = 3 * 3 * 16, 3 * 3 * 32
    assert float(k.std()) == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.05)
    assert float(k.std()) < 0.85 * np.sqrt(2.0 / fan_in)
    assert abs(float(k.mean())) < 0.01
    bn = v["params"]["stage3_block2"]["bn2"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    z = rj.create_model("resnet20", zero_init_residual=True).init(
        jax.random.key(0), jnp.ones((1, 8, 8, 3))
    )
    np.testing.assert_array_equal(z["params"]["stage3_block2"]["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(z["params"]["stage3_block2"]["bn1"]["scale"], 1.0)


BN_MODELS = {
    # resnet8 with projections: stem_bn, bn1, bn2 and shortcut/proj_bn.
    "basic": lambda **bn: rj.create_model("resnet8", shortcut="C", **bn),
    # a small bottleneck net: bn3 too.
    "bottleneck": lambda **bn: rj.ResNet(
        stage_sizes=(1, 1),
        block_cls=rj.BottleneckBlock,
        widths=(4, 8),
        stem="cifar",
        stem_width=8,
        num_classes=3,
        **bn,
    ),
}


def _train_step_seen_by_batchnorms(model, variables, x):
    """One training apply; returns the new batch_stats and, per BatchNorm path,
    its input (the output of its sibling convolution) and its output."""
    bn_paths = set()

    def capture(mdl, _):
        if isinstance(mdl, nn.BatchNorm):
            bn_paths.add(tuple(mdl.path))
        return isinstance(mdl, (nn.Conv, nn.BatchNorm))

    _, state = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=capture,
    )
    seen = flatten_dict(state["intermediates"])
    conv_of = {"stem_bn": "stem_conv", "proj_bn": "proj_conv", "bn1": "conv1", "bn2": "conv2"}
    conv_of["bn3"] = "conv3"
    io = {
        bn: (seen[(*bn[:-1], conv_of[bn[-1]], "__call__")][0], seen[(*bn, "__call__")][0])
        for bn in bn_paths
    }
    return flatten_dict(state["batch_stats"]), io


@pytest.mark.parametrize("net", sorted(BN_MODELS))
def test_bn_options_reach_every_batchnorm(net):
    m, eps = 0.5, 0.25  # far from the defaults (0.9, 1e-5) so that each one shows
    model = BN_MODELS[net](bn_momentum=m, bn_epsilon=eps)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    v = model.init(jax.random.key(1), x)
    # Non-trivial running statistics, so that the update's old term counts too.
    rng = np.random.default_rng(0)
    stats = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v["batch_stats"]
    )
    new, io = _train_step_seen_by_batchnorms(
        model, {"params": v["params"], "batch_stats": stats}, x
    )
    old, params = flatten_dict(stats), flatten_dict(v["params"])
    # Every BatchNorm that ran is checked, and every one has running statistics.
    assert set(io) == {k[:-1] for k in new} and len(io) >= 4
    for bn, (z, y) in io.items():
        z = np.asarray(z, np.float64)
        mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
        # Momentum: ra = m * ra + (1 - m) * batch statistic.
        for stat, batch in (("mean", mean), ("var", var)):
            expected = m * old[(*bn, stat)] + (1 - m) * batch
            np.testing.assert_allclose(new[(*bn, stat)], expected, rtol=1e-4, atol=1e-5)
        # Epsilon: y = (z - mean) / sqrt(var + eps) * scale + bias.
        scale, bias = params[(*bn, "scale")], params[(*bn, "bias")]
        normalised = (z - mean) / np.sqrt(var + eps) * scale + bias
        np.testing.assert_allclose(y, normalised, rtol=1e-4, atol=1e-4)
        with_default_eps = (z - mean) / np.sqrt(var + 1e-5) * scale + bias
        assert not np.allclose(y, with_default_eps, rtol=1e-2, atol=1e-3), bn


def test_custom_network_from_exported_modules():
    model = rj.ResNet(
        stage_sizes=(1, 1),
        block_cls=rj.BottleneckBlock,
        widths=(8, 16),
        stem="cifar",
        stem_width=8,
        num_classes=3,
        shortcut="C",
    )
    x = jnp.ones((2, 16, 16, 3))
    v = model.init(jax.random.key(0), x)
    assert model.apply(v, x).shape == (2, 3)
    assert "proj_conv" in v["params"]["stage1_block1"]["shortcut"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rj.create_model("resnet19"), "Unknown model 'resnet19'.*resnet20"),
        (lambda: rj.create_model("vgg16"), "Valid names"),
        (lambda: rj.create_model("resnet20", widht=2), "Unknown option.*num_classes"),
        (lambda: rj.create_model("resnet20", shortcut="D"), "Unknown shortcut 'D'"),
        (lambda: rj.create_model("resnet50", variant="v2"), "Unknown variant"),
        (lambda: rj.create_model("plain20", shortcut="B"), "plain network"),
        (lambda: rj.create_model("plain20", zero_init_residual=True), "plain network"),
        (lambda: rj.create_model("resnet20", num_classes=-1), "num_classes"),
        (lambda: rj.create_model("resnet20", bn_groups=0), "bn_groups must be an int >= 1"),
        (lambda: rj.create_model("resnet20", bn_groups=2.0), "bn_groups must be an int >= 1"),
    ],
)
def test_bad_options_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _resnet(**fields):
    return rj.ResNet(
        **{"stage_sizes": (1, 1), "block_cls": rj.BasicBlock, "widths": (8, 16), **fields}
    )


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: _resnet(shortcut="D"), "Unknown shortcut 'D'.*'A'.*'B'.*'C'"),
        (lambda: _resnet(variant="v2"), "Unknown variant 'v2'.*'v1'.*'v1.5'"),
        (lambda: _resnet(stem="tiny"), "Unknown stem 'tiny'.*'imagenet'.*'cifar'"),
        (lambda: _resnet(num_classes=-1), "num_classes must be an int >= 0"),
        (lambda: _resnet(widths=(8, 16, 32)), "same length"),
        (lambda: _resnet(stage_sizes=(1, 0)), "stage_sizes"),
        (lambda: rj.ResNet50(shortcut="D"), "Unknown shortcut 'D'"),
        (lambda: rj.BasicBlock(8, conv=None, norm=None, shortcut="D"), "Unknown shortcut 'D'"),
        (lambda: rj.BottleneckBlock(8, conv=None, norm=None, variant="v2"), "Unknown variant"),
        (lambda: rj.Shortcut(8, 1, None, conv=None, norm=None), "valid: 'A', 'B' or 'C'"),
        (lambda: _resnet(bn_groups=True), "bn_groups must be an int >= 1"),
        (lambda: rj.GroupedBatchNorm(groups=-2), "groups must be an int >= 1"),
    ],
)
def test_modules_validate_their_own_fields_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_model_spec_is_the_one_table_behind_names_and_aliases():
    spec = rj.model_spec("resnet50")
    assert isinstance(spec, rj.ModelSpec)
    assert (spec.family, spec.block_cls, spec.stage_sizes) == (
        "imagenet",
        rj.BottleneckBlock,
        (3, 4, 6, 3),
    )
    assert (spec.widths, spec.stem, spec.stem_width, spec.residual) == (
        (64, 128, 256, 512),
        "imagenet",
        64,
        True,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.stage_sizes = (1,)
    cifar = rj.model_spec("plain56")
    assert (cifar.family, cifar.stage_sizes, cifar.widths, cifar.stem_width, cifar.residual) == (
        "cifar",
        (9, 9, 9),
        (16, 32, 64),
        16,
        False,
    )
    aliases = {
        "resnet18": rj.ResNet18,
        "resnet34": rj.ResNet34,
        "resnet50": rj.ResNet50,
        "resnet101": rj.ResNet101,
        "resnet152": rj.ResNet152,
    }
    for name, alias in aliases.items():
        assert alias(num_classes=10) == rj.create_model(name, num_classes=10)


def test_bad_inputs_raise_clear_errors():
    model = rj.create_model("resnet8")
    v = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="NHWC images of rank 4"):
        model.apply(v, jnp.ones((32, 32, 3)))
    with pytest.raises(ValueError, match="looks like NCHW"):
        model.apply(v, jnp.ones((2, 3, 32, 32)))
    with pytest.raises(ValueError, match="1 channels.*initialised for 3"):
        model.apply(v, jnp.ones((2, 32, 32, 1)))


# --------------------------------------------------------------------------- #
# BatchNorm groups ("ghost" BatchNorm).
# --------------------------------------------------------------------------- #


@functools.partial(jax.jit, static_argnums=0)
def _train_apply(model, variables, x):
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, flatten_dict(state["batch_stats"])


@pytest.mark.parametrize("net, groups", [("basic", 2), ("bottleneck", 4)])
def test_bn_groups_equal_the_model_applied_to_each_group(net, groups):
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3)) * 2 + 1
    whole = BN_MODELS[net](bn_momentum=0.5)
    grouped = BN_MODELS[net](bn_momentum=0.5, bn_groups=groups)
    v = whole.init(jax.random.key(1), x)
    # The same variables, names, shapes and initial values: checkpoints move freely.
    jax.tree.map(np.testing.assert_array_equal, grouped.init(jax.random.key(1), x), v)
    rng = np.random.default_rng(0)
    stats = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v["batch_stats"]
    )
    v = {"params": v["params"], "batch_stats": stats}

    logits, new = _train_apply(grouped, v, x)
    parts = [_train_apply(whole, v, xg) for xg in jnp.split(x, groups)]
    scale = float(jnp.abs(logits).max())
    np.testing.assert_allclose(
        logits, np.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-5 * scale
    )
    # The running statistics: the average of the groups' separate updates.
    assert set(new) == set(parts[0][1])
    for k in new:
        expected = np.mean([p[1][k] for p in parts], axis=0)
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6, err_msg=str(k))
    # Not the whole batch's statistics: at the stem, the mean of the group
    # means is the batch mean, but the mean of the group variances leaves out
    # the spread of the group means, so it is smaller.
    whole_logits, whole_new = _train_apply(whole, v, x)
    assert not np.allclose(logits, whole_logits, rtol=1e-3, atol=1e-3 * scale)
    stem = ("stem_bn", "mean")
    np.testing.assert_allclose(new[stem], whole_new[stem], rtol=1e-5, atol=1e-6)
    assert np.all(new[("stem_bn", "var")] < whole_new[("stem_bn", "var")])
    # Evaluation (running statistics) does not depend on the groups.
    np.testing.assert_array_equal(grouped.apply(v, x), whole.apply(v, x))


def test_bn_groups_under_bfloat16_keep_float32_statistics():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    whole = rj.create_model("resnet8", dtype=jnp.bfloat16)
    grouped = rj.create_model("resnet8", dtype=jnp.bfloat16, bn_groups=2)
    v = whole.init(jax.random.key(1), x)
    logits, new = _train_apply(grouped, v, x)
    assert logits.dtype == jnp.float32
    assert {a.dtype for a in new.values()} == {jnp.dtype(jnp.float32)}
    parts = [_train_apply(whole, v, xg) for xg in jnp.split(x, 2)]
    expected = np.concatenate([p[0] for p in parts])
    np.testing.assert_allclose(logits, expected, rtol=0.05, atol=0.05 * float(abs(expected).max()))
    _, state = grouped.apply(
        v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    assert state["intermediates"]["stem_bn"]["__call__"][0].dtype == jnp.bfloat16


def test_bn_groups_1_is_the_ungrouped_model_bit_for_bit():
    def bn_types(model, v, x):
        types = set()

        def capture(mdl, _):
            if mdl.name and "bn" in mdl.name:
                types.add(type(mdl))
            return False

        model.apply(v, x, train=True, mutable=["batch_stats"], capture_intermediates=capture)
        return types

    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    default = rj.create_model("resnet8", shortcut="C", num_classes=10)
    one = rj.create_model("resnet8", shortcut="C", num_classes=10, bn_groups=1)
    assert default.bn_groups == 1
    v = default.init(jax.random.key(1), x)
    # One group keeps flax's nn.BatchNorm, so the numerics are untouched ...
    assert bn_types(one, v, x) == {nn.BatchNorm}
    assert bn_types(rj.create_model("resnet8", bn_groups=2), v, x) == {rj.GroupedBatchNorm}
    for a, b in zip(
        jax.tree.leaves(_train_outputs(default, x)),
        jax.tree.leaves(_train_outputs(one, x)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # ... and GroupedBatchNorm with one group computes what nn.BatchNorm does.
    z = jax.random.normal(jax.random.key(2), (6, 5, 5, 8)) * 3 + 1
    for dtype in (jnp.float32, jnp.bfloat16):
        ref = nn.BatchNorm(momentum=0.8, epsilon=1e-3, dtype=dtype)
        ours = rj.GroupedBatchNorm(groups=1, momentum=0.8, epsilon=1e-3, dtype=dtype)
        vz = ref.init(jax.random.key(3), z, use_running_average=False)
        jax.tree.map(
            np.testing.assert_array_equal,
            ours.init(jax.random.key(3), z, use_running_average=False),
            vz,
        )
        for running in (False, True):
            want = ref.apply(vz, z, use_running_average=running, mutable=["batch_stats"])
            got = ours.apply(vz, z, use_running_average=running, mutable=["batch_stats"])
            assert got[0].dtype == want[0].dtype == dtype
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(
                    np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6
                )


def test_bn_groups_must_divide_the_training_batch():
    model = rj.create_model("resnet8", bn_groups=3)
    x = jnp.ones((4, 16, 16, 3))
    v = model.init(jax.random.key(0), x)  # evaluation mode: any batch
    assert model.apply(v, x).shape == (4, 10)
    with pytest.raises(ValueError, match="batch of 4 examples.*bn_groups=3"):
        model.apply(v, x, train=True, mutable=["batch_stats"])
    assert model.apply(v, jnp.ones((6, 16, 16, 3)), train=True, mutable=["batch_stats"])[0].shape
    bn = rj.GroupedBatchNorm(groups=3)
    with pytest.raises(ValueError, match="batch of 4 examples.*groups=3"):
        bn.init(jax.random.key(0), jnp.ones((4, 2)), use_running_average=False)


def _all_reduce_operands(hlo: str) -> int:
    """Arrays all-reduced by a compiled program, however XLA combined them."""
    n = 0
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if m:  # the result type: one array or a tuple of them
            n += len(re.findall(r"\b[a-z]+[0-9]*\[", m.group(1)))
    return n


def _sharded_programs(groups: int, kinds=("forward", "step", "step_without_stats")):
    """All-reduced arrays in the compiled forward pass and train steps of
    resnet8 on a batch of 16 sharded over 8 devices (the ``kinds`` asked
    for); and the number of parameter and statistic arrays."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = rj.create_model("resnet8", bn_groups=groups)
    x = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))

    def forward(params, stats, x):
        variables = {"params": params, "batch_stats": stats}
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    def loss_fn(params, stats, x):
        logits, new = forward(params, stats, x)
        # Cross-entropy against class 0: a mean over the batch, like the trainer's.
        return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]), new["batch_stats"]

    def step(params, stats, x):
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x)
        return loss, grads, new

    def hlo(f):
        jitted = jax.jit(f, in_shardings=(replicated, replicated, batch))
        return jitted.lower(v["params"], v["batch_stats"], x).compile().as_text()

    programs = dict(
        forward=lambda p, s, x: forward(p, s, x)[0],
        step=step,
        step_without_stats=lambda p, s, x: step(p, s, x)[:2],
    )
    counts = {k: len(jax.tree.leaves(v[k])) for k in ("params", "batch_stats")}
    return {k: _all_reduce_operands(hlo(programs[k])) for k in kinds}, counts


def test_bn_groups_over_the_devices_need_no_cross_device_statistics():
    assert jax.device_count() == 8
    ungrouped, n = _sharded_programs(1)
    # Without groups, every BatchNorm all-reduces its statistics, forward and back.
    assert ungrouped["forward"] >= n["batch_stats"]
    gradients_and_loss = n["params"] + 1
    assert ungrouped["step_without_stats"] > gradients_and_loss
    assert ungrouped["step"] > gradients_and_loss + n["batch_stats"]
    # One group per device: the forward and backward passes reduce nothing
    # across devices but the gradients and the loss ...
    grouped, _ = _sharded_programs(8)
    assert grouped["forward"] == 0
    assert grouped["step_without_stats"] == gradients_and_loss
    # ... and the running statistics add (at most) one mean over the groups each.
    assert grouped["step"] <= gradients_and_loss + n["batch_stats"]
    # Two groups per device: the same.
    grouped, _ = _sharded_programs(16, kinds=("forward", "step_without_stats"))
    assert grouped == {"forward": 0, "step_without_stats": gradients_and_loss}


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, resnet_jax; "
        "heavy = [m for m in ('tensorflow', 'keras', 'torch', 'orbax', 'optax') if m in sys.modules]; "
        "print(heavy); assert not heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_train_steps_and_fast_path_import_without_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, resnet_jax.training.steps, resnet_jax.training.recipe, resnet_jax.training.loop, "
        "resnet_jax.data.device, resnet_jax.training.runtime; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_param_dtype_is_the_storage_dtype_and_statistics_stay_float32():
    model = rj.create_model("resnet8", param_dtype=jnp.bfloat16)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
    assert {x.dtype for x in jax.tree.leaves(v["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(v["batch_stats"])} == {jnp.dtype(jnp.float32)}
    default = rj.create_model("resnet8")
    v32 = jax.eval_shape(lambda: default.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
    assert {x.dtype for x in jax.tree.leaves(v32["params"])} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "options, says",
    [
        ({"bn_momentum": 1.5}, "bn_momentum must be in [0, 1)"),
        ({"bn_momentum": -0.1}, "bn_momentum must be in [0, 1)"),
        ({"bn_epsilon": -1e-5}, "bn_epsilon must be positive"),
        ({"bn_epsilon": 0.0}, "bn_epsilon must be positive"),
        ({"dtype": "float33"}, "dtype='float33' names no floating-point dtype"),
        ({"param_dtype": jnp.int32}, "param_dtype=<class 'jax.numpy.int32'> names no"),
    ],
)
def test_values_that_would_give_nan_or_nonsense_are_refused(options, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        rj.create_model("resnet8", **options)
    # The same fields, set directly, are checked by the module itself.
    with pytest.raises(ValueError, match=re.escape(says)):
        rj.ResNet(stage_sizes=(1,), block_cls=rj.BasicBlock, widths=(16,), **options)


def test_a_dtype_name_is_a_dtype():
    assert rj.create_model("resnet8", dtype="bfloat16").dtype == "bfloat16"


def test_an_nchw_looking_input_at_init_is_refused():
    model = rj.create_model("resnet8")
    with pytest.raises(ValueError, match=r"looks like NCHW .* initialised for 32 input channels"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 3, 32, 32))))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
    assert v["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 16)
