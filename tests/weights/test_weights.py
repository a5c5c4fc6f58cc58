"""rj.weights.from_keras against keras.applications (JAX backend, no download)."""

import dataclasses

import jax
import keras
import numpy as np
import pytest

import resnet_jax as rj


def randomise(model, seed=0):
    """Non-trivial BatchNorm statistics/affine terms and conv biases."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        w = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = w
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, g.shape),
                    rng.normal(0, 0.2, b.shape),
                    rng.normal(0, 0.2, m.shape),
                    rng.uniform(0.5, 2.0, v.shape),
                ]
            )
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and len(w) == 2:
            layer.set_weights([w[0], rng.normal(0, 0.1, w[1].shape)])
    return model


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def resnet50():
    return randomise(keras.applications.ResNet50(weights=None, classifier_activation=None))


def check(keras_model, x, *, train_too=True):
    module, variables = rj.weights.from_keras(keras_model)
    # Inference first: Keras' training call updates its moving statistics in place.
    out = module.apply(variables, x, train=False)
    assert rel_err(out, keras_model(x, training=False)) < 1e-4
    if train_too:
        out_t, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
        assert rel_err(out_t, keras_model(x, training=True)) < 1e-3
    return module, variables


def test_resnet50_224(resnet50):
    x = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    module, variables = check(resnet50, x)
    assert module.bn_epsilon == pytest.approx(1.001e-5) and module.bn_momentum == pytest.approx(
        0.99
    )
    assert module.variant == "v1" and module.num_classes == 1000
    # Keras' conv biases are folded into the BatchNorm means: torchvision's count.
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 25_557_032


def test_resnet50_odd_size_and_running_statistics(resnet50):
    ref = keras.applications.ResNet50(
        weights=None, classifier_activation=None, input_shape=(97, 131, 3)
    )
    ref.set_weights(resnet50.get_weights())
    x = np.random.default_rng(2).normal(size=(3, 97, 131, 3)).astype(np.float32)
    module, variables = check(ref, x, train_too=False)
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    y_train = ref(x, training=True)  # updates Keras' moving statistics
    del y_train
    _, after = rj.weights.from_keras(ref)
    for path in [("stem_bn", "mean"), ("stage4_block1", "shortcut", "proj_bn", "var")]:
        a, b = updates["batch_stats"], after["batch_stats"]
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_carries_keras_preprocessing(resnet50):
    converted = rj.weights.from_keras(resnet50)
    assert isinstance(converted, rj.weights.Converted) and converted.module is converted[0]
    assert converted.preprocessing == rj.weights.PREPROCESSING["keras"]
    img = np.random.default_rng(6).integers(0, 256, (2, 224, 224, 3)).astype(np.uint8)
    # Keras' preprocess_input neither resizes nor crops: compare the rest.
    same_size = dataclasses.replace(converted.preprocessing, resize=None, crop=None)
    ours = rj.weights.preprocess(img, same_size)
    ref = keras.applications.resnet.preprocess_input(img.astype(np.float32))
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_softmax_classifier_gives_probabilities(resnet50):
    ref = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    ref.set_weights(resnet50.get_weights())
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
    module, variables = rj.weights.from_keras(ref)
    probs = jax.nn.softmax(module.apply(variables, x))
    assert rel_err(probs, ref(x, training=False)) < 1e-4


STAGES = {"101": (3, 4, 23, 3), "152": (3, 8, 36, 3)}


@pytest.mark.parametrize("name", ["ResNet101", "ResNet152", "ResNet101V2", "ResNet152V2"])
def test_deeper_resnets(name):
    ref = randomise(
        getattr(keras.applications, name)(
            weights=None, classifier_activation=None, input_shape=(97, 131, 3), classes=10
        )
    )
    x = np.random.default_rng(4).normal(size=(3, 97, 131, 3)).astype(np.float32)
    module, _ = check(ref, x)
    assert module.stage_sizes == STAGES[name[6:9]]
    assert module.preact == name.endswith("V2")


def folded_biases(keras_model):
    """Parameters Keras has and the conversion folds: the biases of every
    convolution but V2's stem (V2's sit on the residual stream)."""
    return sum(
        layer.get_weights()[1].size
        for layer in keras_model.layers
        if isinstance(layer, keras.layers.Conv2D)
        and layer.use_bias
        and not (layer.name == "conv1_conv" and "post_bn" in [n.name for n in keras_model.layers])
    )


@pytest.fixture(scope="module")
def resnet50v2():
    return randomise(keras.applications.ResNet50V2(weights=None, classifier_activation=None))


def test_resnet50v2_224_in_both_modes(resnet50v2):
    x = np.random.default_rng(7).normal(size=(2, 224, 224, 3)).astype(np.float32)
    module, variables = check(resnet50v2, x)
    assert (module.preact, module.variant, module.stride_block) == (True, "v1.5", "last")
    assert module.stem_bias and module.stem_pool_zeros
    assert module.bn_epsilon == pytest.approx(1.001e-5) and module.num_classes == 1000
    ours = sum(p.size for p in jax.tree.leaves(variables["params"]))
    trainable = sum(int(np.prod(w.shape)) for w in resnet50v2.trainable_weights)
    assert ours + folded_biases(resnet50v2) == trainable == 25_568_360
    # Each layout option matters: without it the same variables compute another function.
    expected = resnet50v2(x, training=False)
    for field, default in (("stride_block", "first"), ("stem_pool_zeros", False)):
        other = module.copy(**{field: default})
        assert rel_err(other.apply(variables, x), expected) > 1e-3, field


def test_resnet50v2_running_statistics_and_preprocessing(resnet50v2):
    ref = keras.applications.ResNet50V2(
        weights=None, classifier_activation=None, input_shape=(65, 81, 3)
    )
    ref.set_weights(resnet50v2.get_weights())
    x = np.random.default_rng(8).normal(size=(3, 65, 81, 3)).astype(np.float32)
    converted = rj.weights.from_keras(ref)
    module, variables = converted
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    ref(x, training=True)  # updates Keras' moving statistics
    _, after = rj.weights.from_keras(ref)
    # final_bn and stage1_block3/bn1 read the residual stream, whose biases are folded.
    for path in [("final_bn", "mean"), ("stage1_block3", "bn1", "mean"), ("final_bn", "var")]:
        a, b = updates["batch_stats"], after["batch_stats"]
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert converted.preprocessing == rj.weights.PREPROCESSING["keras-v2"]
    img = np.random.default_rng(9).integers(0, 256, (2, 224, 224, 3)).astype(np.uint8)
    same_size = dataclasses.replace(converted.preprocessing, resize=None, crop=None)
    ours = rj.weights.preprocess(img, same_size)
    theirs = keras.applications.resnet_v2.preprocess_input(img.astype(np.float32))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_headless_with_avg_pooling():
    for keras_cls in (keras.applications.ResNet50, keras.applications.ResNet50V2):
        ref = randomise(
            keras_cls(weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3))
        )
        x = np.random.default_rng(5).normal(size=(2, 64, 64, 3)).astype(np.float32)
        module, _ = check(ref, x, train_too=False)
        assert module.num_classes == 0


def test_unsupported_models_get_a_clear_error():
    tiny = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match="no ResNet layer names.*Supported.*ResNet50V2"):
        rj.weights.from_keras(tiny)
    for keras_cls in (keras.applications.ResNet50, keras.applications.ResNet50V2):
        headless = keras_cls(weights=None, include_top=False, input_shape=(64, 64, 3))
        with pytest.raises(ValueError, match="feature map"):
            rj.weights.from_keras(headless)
    with pytest.raises(ValueError, match="not a Keras model"):
        rj.weights.from_keras(object())
