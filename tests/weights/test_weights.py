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


@pytest.mark.parametrize("name", ["ResNet101", "ResNet152"])
def test_deeper_resnets(name):
    ref = randomise(
        getattr(keras.applications, name)(
            weights=None, classifier_activation=None, input_shape=(97, 131, 3), classes=10
        )
    )
    x = np.random.default_rng(4).normal(size=(3, 97, 131, 3)).astype(np.float32)
    module, _ = check(ref, x)
    assert module.stage_sizes == {"ResNet101": (3, 4, 23, 3), "ResNet152": (3, 8, 36, 3)}[name]


def test_headless_with_avg_pooling():
    ref = randomise(
        keras.applications.ResNet50(
            weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3)
        )
    )
    x = np.random.default_rng(5).normal(size=(2, 64, 64, 3)).astype(np.float32)
    module, _ = check(ref, x, train_too=False)
    assert module.num_classes == 0


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(ValueError, match="pre-activation ResNetV2"):
        rj.weights.from_keras(keras.applications.ResNet50V2(weights=None, input_shape=(64, 64, 3)))
    tiny = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match="no ResNet v1 layer names.*Supported"):
        rj.weights.from_keras(tiny)
    headless = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="feature map"):
        rj.weights.from_keras(headless)
    with pytest.raises(ValueError, match="not a Keras model"):
        rj.weights.from_keras(object())
