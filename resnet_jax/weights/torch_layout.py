"""PyTorch state dicts in torchvision's layout: torchvision and timm's plain
``resnet*``, and the option-A/B CIFAR ResNets of PyTorch reproductions
(:func:`from_torchvision`), with the reading and mapping that the transformers
converter and the torchvision export share.

``.safetensors`` files are read with safetensors and numpy; torch is imported
only to read ``.pth``/``.bin`` pickles (it is a test- and user-side
dependency, not one of this package's). Every file is read by
:func:`read_weights_file`, which turns any failure to read one (not such a
file, truncated, not a state dict) into one :class:`WeightsFileError` line
naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.errors import UserError, one_line
from resnet_jax.models import BasicBlock, BottleneckBlock, ResNet, model_spec
from resnet_jax.weights.preprocessing import Converted, Preprocessing, preprocessing_record

TORCH_BN_EPSILON = 1e-5
TORCH_BN_MOMENTUM = 0.1
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".th", ".ckpt", ".tar")
# ResNet fields a caller may set on a converted model; the rest come from the weights.
CONVERTER_OPTIONS = (
    "dtype",
    "param_dtype",
    "bn_momentum",
    "bn_epsilon",
    "bn_groups",
    "materialize",
)
_SUPPORTED_TORCH = (
    "torchvision resnet*, resnext*, wide_resnet* and timm's resnet*, resnet*d, resnext*, "
    "seresnet* (7x7 or deep stem, v1.5 bottlenecks or basic blocks, 1x1 projection shortcuts "
    "'downsample.0/1' or ResNet-D's 'downsample.1/2'), and CIFAR ResNets with a 3x3 stem "
    "(conv1, bn1, layer1..3, linear; option-A shortcuts, or option B as shortcut.0/1); "
    "timm's resnetv2_* through from_timm"
)


class Refused(ValueError):
    """A state dict the converters cannot convert; the message names the tensor."""


def _is_tensor(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch.Tensor: torch was imported by whoever made it
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()  # exact for float16/bfloat16, which numpy cannot take from torch
        return v.numpy()
    return np.asarray(v)


def read_source(source: Any, who: str) -> tuple[Mapping[str, Any], str | None]:
    """The raw state dict of ``source`` and the checkpoint directory it came from."""
    if hasattr(source, "state_dict") and callable(source.state_dict):
        return source.state_dict(), None  # a torch.nn.Module
    if isinstance(source, Mapping):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{who} takes a state dict (names to tensors or arrays), a torch module or a "
            f"path, got {type(source).__name__}."
        )
    path = os.fspath(source)
    directory = None
    if os.path.isdir(path):
        directory = path
        names = ("model.safetensors", "pytorch_model.bin")
        found = [n for n in names if os.path.exists(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{who}: {path} holds neither of {', '.join(names)}.")
        path = os.path.join(path, found[0])
    if not path.endswith((".safetensors", *_TORCH_SUFFIXES)):
        raise ValueError(
            f"{who}: cannot read {path!r}: expected a .safetensors file, a PyTorch file "
            f"({', '.join(_TORCH_SUFFIXES)}) or a Hugging Face checkpoint directory."
        )
    return read_weights_file(path, who), directory


class WeightsFileError(UserError):
    """A weights file that cannot be read as a state dict (a ``ValueError``).

    The message is ``'{who}: {file} {reason}'``: what the file is or holds,
    and what to do. ``file`` and ``reason`` are kept apart for the commands,
    which name the path the user gave (:meth:`about`).
    """

    def __init__(self, who: str, file: str, reason: str):
        super().__init__(one_line(f"{who}: {file} {reason}"))
        self.who, self.file, self.reason = who, file, one_line(reason)

    def __reduce__(self):  # pickled with its three fields, not the message
        return type(self), (self.who, self.file, self.reason)

    def about(self, given: str | os.PathLike) -> str:
        """The reason with its subject: 'it ...' when ``file`` is ``given``, else 'FILE ...'."""
        same = os.path.abspath(os.fspath(given)) == os.path.abspath(self.file)
        return f"{'it' if same else self.file} {self.reason}"


class TorchNeededError(WeightsFileError, ImportError):
    """A PyTorch file, and torch is not installed (an ``ImportError`` too)."""


# Bytes read to tell what a file that does not load is.
_HEAD_BYTES = 1024
_ZIP = b"PK\x03\x04"  # torch.save's archive since torch 1.6
_PICKLE = b"\x80"  # a pickle of protocol 2 or later: torch.save's older format


def read_weights_file(path: str, who: str) -> Mapping[str, Any]:
    """The state dict in a ``.safetensors`` file (read with safetensors and
    numpy) or a PyTorch file (``torch.load(weights_only=True)``: no code in the
    file runs).

    Raises:
      OSError: the file cannot be opened (missing, no permission).
      WeightsFileError: on one line naming the file, for one that is not a
        safetensors or PyTorch file (text, an HTML page, a Git LFS pointer,
        empty, the other format), is truncated or damaged, holds Python
        objects that ``weights_only`` refuses (a pickled model), or holds
        something else than a state dict (a list, a tensor, a dict without
        tensors).
      TorchNeededError: a PyTorch file without torch installed.
      ImportError: a ``.safetensors`` file without the safetensors package.
    """
    safetensors = path.endswith(".safetensors")
    kind = "safetensors" if safetensors else "PyTorch"
    with open(path, "rb") as f:  # an OSError names the file
        head = f.read(_HEAD_BYTES)
    size = os.path.getsize(path)
    load = _loader(path, who, head, size, kind)
    try:
        raw = load(path)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a loader raises on bad bytes is the file's
        raise WeightsFileError(who, path, _unreadable(e, head, size, kind)) from e
    held = _not_a_state_dict(raw)
    if held:
        save = "safetensors.torch.save_file" if safetensors else "torch.save"
        raise WeightsFileError(
            who,
            path,
            f"holds {held}, not a state dict (tensor names to tensors): save one with "
            f"{save}(model.state_dict(), path).",
        )
    return raw


def _loader(path: str, who: str, head: bytes, size: int, kind: str) -> Callable[[str], Any]:
    """The function reading ``kind`` files; raises when its library is not installed."""
    if kind == "safetensors":
        try:
            from safetensors.numpy import load_file  # lazy: import resnet_jax needs jax + flax only
        except ImportError as e:
            raise ImportError(
                f"{who}: reading {path} needs the safetensors package (pip install "
                "safetensors); torch is not needed."
            ) from e
        return load_file
    try:
        import torch  # lazy: a test- and user-side dependency, not ours
    except ImportError as e:
        foreign = _foreign(head, size, kind)  # no torch needed to tell it is no PyTorch file
        if foreign:
            raise WeightsFileError(who, path, foreign) from None
        raise TorchNeededError(
            who,
            path,
            "is a PyTorch pickle, and reading it needs torch (pip install torch). A "
            ".safetensors file of the same weights is read without torch.",
        ) from e
    return functools.partial(torch.load, map_location="cpu", weights_only=True)


def _unreadable(error: Exception, head: bytes, size: int, kind: str) -> str:
    """Why a file did not load: what it is instead, or that it is cut short or damaged."""
    foreign = _foreign(head, size, kind)
    if foreign:
        return foreign
    message = str(error)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if isinstance(error, pickle.UnpicklingError) and refused:
        return (
            f"holds Python objects other than tensors (the first: {refused[1]}; a pickled "
            "model, or a training checkpoint with other objects), which "
            "torch.load(weights_only=True) does not load: resnet_jax runs no code from a "
            "file. Where the file is trusted, save the weights alone: "
            "torch.save(model.state_dict(), path)."
        )
    detail = one_line(message)[:200] if message.strip() else ""
    detail = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return (
        f"is truncated or damaged ({size} bytes; {kind}: {detail}); delete it and download "
        "or save it again."
    )


def _foreign(head: bytes, size: int, kind: str) -> str | None:
    """What a file is when it is plainly not a ``kind`` file (None: it may be one)."""
    if size == 0:
        return f"is empty (0 bytes), not a {kind} file: download or save it again."
    if head.startswith(b"version https://git-lfs"):
        return (
            "is a Git LFS pointer, not the weights: run `git lfs pull` in its repository, or "
            "download the file itself."
        )
    text = _text(head)
    if text is not None and re.match(r"\s*<(!doctype html|html)", text, re.IGNORECASE):
        return (
            f"is an HTML page, not a {kind} file: a web page saved instead of the file? (On "
            "the Hugging Face hub, download from .../resolve/..., not .../blob/...)"
        )
    if text is not None:
        start = one_line(text)
        start = f"{start[:40]!r}..." if len(start) > 40 else repr(start)
        writer = "torch.save" if kind == "PyTorch" else "safetensors' save_file"
        return f"is text ({start}), not a {kind} file (what {writer} writes)."
    looks_safetensors = size > 8 and head[8:9] == b"{"
    if kind == "safetensors" and head.startswith((_ZIP, _PICKLE)):
        return "is a PyTorch file, not a safetensors file: name it .pth."
    if kind == "PyTorch" and looks_safetensors:
        return "is a safetensors file, not a PyTorch file: name it .safetensors."
    if kind == "PyTorch" and not head.startswith((_ZIP, _PICKLE)):
        return (
            f"is not a PyTorch file: it starts with {head[:8]!r}, neither a zip archive "
            "(torch.save) nor a pickle."
        )
    if kind == "safetensors" and not looks_safetensors:
        return "is not a safetensors file: it has no JSON header after its first 8 bytes."
    return None


def _text(head: bytes) -> str | None:
    """``head`` as text, if it is printable UTF-8 (a multi-byte character may be cut at its end)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    if not text or not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    return text


def _unwrapped(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """A training checkpoint's inner state dict (``state_dict``, ``model``, ...), else ``raw``."""
    for key in ("state_dict", "model", "model_state_dict"):
        inner = raw.get(key)
        if isinstance(inner, Mapping) and not _is_tensor(inner):
            return inner
    return raw


def _not_a_state_dict(raw: Any) -> str | None:
    """What a loaded file holds, when that is not a state dict (None: it is one)."""
    if _is_tensor(raw):
        return f"a single tensor of shape {tuple(raw.shape)}"
    if not isinstance(raw, Mapping):
        items = f" of {len(raw)} items" if isinstance(raw, (list, tuple)) else ""
        return f"a {type(raw).__name__}{items}"
    inner = _unwrapped(raw)
    if any(_is_tensor(v) for v in inner.values()):
        return None
    if not inner:
        return "an empty dict"
    keys = ", ".join(repr(k) for k in list(inner)[:3]) + (", ..." if len(inner) > 3 else "")
    return f"a dict without tensors (keys {keys})"


def state_dict_arrays(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy arrays by name, unwrapped from training checkpoints and DataParallel."""
    raw = _unwrapped(raw)
    state = {str(k): _to_numpy(v) for k, v in raw.items() if _is_tensor(v)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _refuse_variants(state: Mapping[str, np.ndarray], name: Callable[[str], str]) -> None:
    """Raises Refused for ResNet relatives whose tensors have other roles."""
    for k in sorted(state):
        if re.search(r"\.(se_module|attn|eca|cbam|gct)\.", k) or (
            ".se." in k and not re.search(r"\.se\.fc[12]\.(weight|bias)$", k)
        ):
            raise Refused(f"tensor {name(k)} belongs to an attention block other than timm's SE")
        if re.search(r"\.conv2\.(conv|fc1|fc2|bn0|bn1|rsoftmax)\.", k) or "radix" in k:
            raise Refused(f"tensor {name(k)} belongs to a split-attention block (ResNeSt)")
        if k.startswith(("attnpool.", "head.attn", "global_pool.")) or ".drop_block." in k:
            raise Refused(f"tensor {name(k)} belongs to an attention pool or other head")
    if "conv1.0.weight" in state and any(k.startswith("conv1.") and ".7." in k for k in state):
        raise Refused("tensor conv1.7.* belongs to a stem other than ResNet-D's three convolutions")


def require(state: Mapping[str, np.ndarray], key: str, name: Callable[[str], str]) -> np.ndarray:
    if key not in state:
        raise Refused(f"tensor {name(key)} is missing")
    return state[key]


def _infer(state: Mapping[str, np.ndarray], name: Callable[[str], str]) -> dict[str, Any]:
    """ResNet fields read off a state dict in torchvision's naming.

    The stem from ``conv1.weight`` (or timm's deep stem ``conv1.0/3/6``), the
    block type from the presence of ``conv3``, stage sizes from the
    ``layer{s}.{b}`` indices, widths, groups and inner width from the
    shapes, SE from ``se.fc1``, the shortcut option from where
    ``downsample``/``shortcut`` tensors are (none: A; in every block: C;
    else B), ResNet-D's average-pool shortcut from ``downsample.2``.
    """
    deep = "conv1.0.weight" in state
    stem = require(state, "conv1.0.weight" if deep else "conv1.weight", name)
    if stem.ndim != 4 or stem.shape[2:] not in ((7, 7), (3, 3)) or (deep and stem.shape[2] != 3):
        raise Refused(
            f"tensor {name('conv1.weight')} of shape {stem.shape} is neither a 7x7 (ImageNet) "
            "nor a 3x3 (CIFAR) stem"
        )
    stem_width = int(require(state, "conv1.6.weight", name).shape[0]) if deep else stem.shape[0]
    blocks: dict[int, int] = {}
    for k in state:
        m = re.match(r"layer(\d+)\.(\d+)\.", k)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    if not blocks:
        raise Refused(f"no tensor of a residual stage (e.g. {name('layer1.0.conv1.weight')})")
    stages = range(1, max(blocks) + 1)
    stage_sizes = tuple(blocks.get(s, 0) for s in stages)
    if min(stage_sizes) == 0:
        missing = next(s for s in stages if s not in blocks)
        raise Refused(f"tensor {name(f'layer{missing}.0.conv1.weight')} is missing")
    bottleneck = "layer1.0.conv3.weight" in state
    inner = int(require(state, "layer1.0.conv1.weight", name).shape[0])
    grouped = require(state, "layer1.0.conv2.weight", name)
    groups = max(1, inner // int(grouped.shape[1])) if grouped.ndim == 4 else 1
    if bottleneck:
        widths = tuple(
            int(require(state, f"layer{s}.0.conv3.weight", name).shape[0]) // 4 for s in stages
        )
        base_width = inner * 64 // (groups * widths[0])
    else:
        widths = tuple(
            int(require(state, f"layer{s}.0.conv1.weight", name).shape[0]) for s in stages
        )
        base_width = 64
    projected = {
        m[1] for k in state if (m := re.match(r"(layer\d+\.\d+)\.(downsample|shortcut)\.\d\.", k))
    }
    avg_down = any(re.match(r"layer\d+\.\d+\.downsample\.2\.", k) for k in state)
    # B projects where the shape changes: the first block of every stage but
    # (when the stem's width is the first stage's output) the first stage.
    out1 = widths[0] * (4 if bottleneck else 1)
    where_b = {f"layer{s}.0" for s in stages if s > 1 or out1 != stem_width}
    n_blocks = sum(stage_sizes)
    shortcut = (
        "A"
        if not projected
        else "C"
        if len(projected) == n_blocks and projected != where_b
        else "B"
    )
    fields: dict[str, Any] = dict(
        stage_sizes=stage_sizes,
        block_cls=BottleneckBlock if bottleneck else BasicBlock,
        widths=widths,
        stem="deep" if deep else "imagenet" if stem.shape[2] == 7 else "cifar",
        stem_width=int(stem_width),
        shortcut=shortcut,
    )
    # The later ResNets' fields, only where they differ from the paper's net.
    if groups != 1:
        fields["groups"] = groups
    if base_width != 64:
        fields["base_width"] = base_width
    if avg_down:
        fields["avg_down"] = True
    if "layer1.0.se.fc1.weight" in state:
        fields["se"] = True
    return fields


_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


_DEEP_STEM = {
    "stem_conv": "conv1.0",
    "stem_bn": "conv1.1",
    "stem_conv2": "conv1.3",
    "stem_bn2": "conv1.4",
    "stem_conv3": "conv1.6",
    "stem_bn3": "bn1",
}


def torch_name(
    path: tuple[str, ...],
    classifier: str = "fc",
    projection: str = "downsample",
    *,
    deep_stem: bool = False,
    avg_down: bool = False,
):
    """The torchvision-layout name of the variable at ``(collection, *module_path, leaf)``.

    ``deep_stem``: timm's ResNet-C/D stem ``conv1.{0,1,3,4,6}`` + ``bn1``;
    ``avg_down``: ResNet-D's ``downsample.{1,2}`` (after the pool);
    squeeze-and-excitation is timm's ``se.fc1``/``se.fc2``.
    """
    collection, *modules, leaf = path
    parts = []
    offset = 1 if avg_down else 0
    for p in modules:
        block = re.fullmatch(r"stage(\d+)_block(\d+)", p)
        if block:
            parts.append(f"layer{block[1]}.{int(block[2]) - 1}")
        elif deep_stem and p in _DEEP_STEM:
            parts.append(_DEEP_STEM[p])
        elif p != "shortcut":
            parts.append(
                {
                    "stem_conv": "conv1",
                    "stem_bn": "bn1",
                    "head": classifier,
                    "proj_conv": f"{projection}.{offset}",
                    "proj_bn": f"{projection}.{offset + 1}",
                    "reduce": "fc1",
                    "expand": "fc2",
                }.get(p, p)
            )
    return ".".join([*parts, _LEAF_NAMES[collection, leaf]])


def _to_flax(torch_value: np.ndarray) -> np.ndarray:
    """OIHW convolution -> HWIO, (out, in) linear -> (in, out); vectors as they are."""
    if torch_value.ndim == 4:
        return torch_value.transpose(2, 3, 1, 0)
    if torch_value.ndim == 2:
        return torch_value.T
    return torch_value


def to_torch_array(flax_value: Any) -> np.ndarray:
    """HWIO -> OIHW, (in, out) -> (out, in): a new, writable, C-contiguous float32 array."""
    value = np.asarray(flax_value, np.float32)
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
        value = value.T
    return np.array(value, np.float32, order="C")


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    return tuple(reversed(flax_shape))


def variable_shapes(module: ResNet, in_channels: int) -> dict[tuple[str, ...], Any]:
    """The module's variables, flattened, as shapes: nothing is computed."""
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, in_channels)))
    )
    return traverse_util.flatten_dict(shapes)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a family of PyTorch state dicts names a ResNet's tensors.

    Attributes:
      refuse: raises Refused for tensors of layouts this converter lacks.
      infer: the :class:`ResNet` fields read off the tensors.
      classifier: the classifier's name prefix in a state dict (``'fc'``).
      namer: ``(module, state) -> (variable path -> tensor name)``.
    """

    refuse: Callable[[Mapping[str, np.ndarray], Callable[[str], str]], None]
    infer: Callable[[Mapping[str, np.ndarray], Callable[[str], str]], dict[str, Any]]
    classifier: Callable[[Mapping[str, np.ndarray]], str]
    namer: Callable[[ResNet, Mapping[str, np.ndarray]], Callable[[tuple[str, ...]], str]]


def _torchvision_namer(module: ResNet, state: Mapping[str, np.ndarray]):
    classifier = "linear" if "linear.weight" in state else "fc"
    projection = "shortcut" if any(".shortcut.0." in k for k in state) else "downsample"
    return functools.partial(
        torch_name,
        classifier=classifier,
        projection=projection,
        deep_stem=module.stem == "deep",
        avg_down=module.avg_down,
    )


TORCHVISION_LAYOUT = Layout(
    refuse=_refuse_variants,
    infer=_infer,
    classifier=lambda state: "linear" if "linear.weight" in state else "fc",
    namer=_torchvision_namer,
)


def _convert(
    state: dict[str, np.ndarray],
    *,
    name: Callable[[str], str],
    model: str | None,
    num_classes: int | None,
    variant: str,
    options: Mapping[str, Any],
    layout: Layout | None = None,
) -> tuple[ResNet, dict[str, Any]]:
    """The module and variables of a state dict in ``layout``'s naming
    (default: torchvision's)."""
    unknown = sorted(set(options) - set(CONVERTER_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown}; valid: {', '.join(CONVERTER_OPTIONS)}.")
    layout = layout or TORCHVISION_LAYOUT
    layout.refuse(state, name)
    fields = layout.infer(state, name)
    if model is not None:
        spec = model_spec(model)
        shortcut = fields["shortcut"] if spec.residual else None
        fields = dict(spec.resnet_fields(), shortcut=shortcut)
    classifier = layout.classifier(state)
    state, num_classes = _classifier(state, classifier, num_classes, name)
    module = ResNet(
        **{"variant": variant, **fields},
        num_classes=num_classes,
        **{"bn_momentum": 1 - TORCH_BN_MOMENTUM, "bn_epsilon": TORCH_BN_EPSILON, **options},
    )
    namer = layout.namer(module, state)
    in_channels = int(require(state, namer(("params", "stem_conv", "kernel")), name).shape[1])
    flat: dict[tuple[str, ...], np.ndarray] = {}
    # In torchvision's order, so that the first tensor named is the first one off.
    named = {
        namer(path): (path, shape) for path, shape in variable_shapes(module, in_channels).items()
    }
    for key in sorted(named, key=torchvision_order):
        path, shape = named[key]
        value = _to_flax(require(state, key, name))
        if value.shape != shape.shape:
            raise Refused(
                f"tensor {name(key)} has shape {state[key].shape}, but "
                f"{model or 'the network the other tensors describe'} needs "
                f"{_torch_shape(shape.shape)}"
            )
        # A copy: numpy views of torch tensors would change with the torch model.
        flat[path] = np.array(value, np.float32, order="C")
    extra = sorted(
        (k for k in state if k not in named and not k.endswith(".num_batches_tracked")),
        key=torchvision_order,
    )
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise Refused(f"tensor {name(extra[0])}{more} has no place in {model or 'the network'}")
    return module, traverse_util.unflatten_dict(flat)


def _classifier(
    state: dict[str, np.ndarray], classifier: str, num_classes: int | None, name: Callable
) -> tuple[dict[str, np.ndarray], int]:
    """The state dict (less the classifier for num_classes=0) and the number of classes."""
    weight = f"{classifier}.weight"
    available = int(state[weight].shape[0]) if weight in state else 0
    if num_classes is None:
        return state, available
    if num_classes == 0:
        return {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}, 0
    if num_classes != available:
        raise ValueError(
            f"num_classes={num_classes}, but the weights have a {available}-class classifier "
            f"(tensor {name(weight)}); pass num_classes=0 to drop it and train a new one."
        )
    return state, num_classes


def convert_or_refuse(who: str, supported: str, **kw) -> tuple[ResNet, dict[str, Any]]:
    try:
        return _convert(**kw)
    except Refused as e:
        raise ValueError(
            f"{who} cannot convert this state dict: {e}. Supported: {supported}."
        ) from None


def from_torchvision(
    source: Any,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    preprocessing: Preprocessing | str | None = None,
    **options: Any,
) -> Converted:
    """Converts a torchvision / timm ResNet, or a PyTorch CIFAR ResNet, to Flax.

    Reads torchvision's ``resnet18/34/50/101/152``, ``resnext*`` and
    ``wide_resnet*`` (V1 and V2 weights), timm's ``resnet*`` in the same
    naming (``resnet50.a1_in1k``, ``resnet26``; the deep stems, ResNet-D
    shortcuts and SE modules of ``resnet50d``/``seresnet50`` too, which
    :func:`~resnet_jax.weights.from_timm` also reads) and the CIFAR
    ResNets of akamaster/pytorch_resnet_cifar10 and most reproductions (3x3
    stem, ``layer1..3``, ``linear``; option-A shortcuts, taken as such when
    there are no projections: pass ``name='plain20'`` etc. for a plain net; or
    option B as ``shortcut.0/1``). The architecture is read off the tensors;
    bottlenecks are ``variant='v1.5'``, as in torchvision and timm. The result
    computes the same function as the source in both modes (module docstring).

    Args:
      source: a state dict (names to torch tensors or numpy arrays; a
        checkpoint's ``{'state_dict': ...}`` or ``{'model': ...}`` and
        DataParallel's ``module.`` prefix are unwrapped), a torch module, or a
        path: ``.safetensors`` (read without torch) or ``.pth``/``.pt``/
        ``.bin``/``.th`` (needs torch). Nothing is downloaded.
      name: check the weights against a named model (``'resnet50'``,
        ``'resnet20'``, ``'plain20'``, ...) instead of reading the
        architecture off them alone; a mismatch names the first tensor off.
      num_classes: None keeps the classifier (``fc``/``linear``) or its
        absence; 0 drops it (the module returns pooled features); any other
        value must match the weights'.
      preprocessing: the :class:`Preprocessing` (or name in ``PREPROCESSING``)
        the result carries. Default: 'torchvision' (V1 weights) for ImageNet
        nets, 'cifar' for CIFAR nets; torchvision's V2 weights want
        'torchvision-v2', timm's ``Preprocessing.from_timm(cfg)``.
      **options: ResNet fields for the converted module, one of
        ``CONVERTER_OPTIONS`` (``dtype``, ``param_dtype``, ``bn_momentum``,
        ``bn_epsilon``, ``bn_groups``, ``materialize``).

    Returns:
      A :class:`Converted` ``(module, {'params', 'batch_stats'})`` of float32
      numpy arrays, with ``.preprocessing``.

    Raises:
      ValueError: for a layout this converter does not support (attention
        blocks other than timm's SE, ResNeSt, other stems), a missing or an
        extra tensor, or a shape that does not fit; the message names the tensor.
        For a file that cannot be read as a state dict (not a safetensors or
        PyTorch file, truncated or damaged, a pickled model, something else
        than a state dict), a :class:`WeightsFileError` (a ``ValueError``) on
        one line naming the file and what to do.
      ImportError: for a ``.pth``/``.bin`` file without torch installed (a
        :class:`TorchNeededError`, also a ``WeightsFileError``).
      OSError: for a file that cannot be opened (missing, no permission).
    """
    who = "from_torchvision"
    raw, _ = read_source(source, who)
    module, variables = convert_or_refuse(
        who,
        _SUPPORTED_TORCH,
        state=_torchvision_state(raw, who),
        name=lambda k: k,
        model=name,
        num_classes=num_classes,
        variant="v1.5",
        options=options,
    )
    if preprocessing is None:
        preprocessing = "torchvision" if module.stem == "imagenet" else "cifar"
    return Converted(module, variables, preprocessing_record(preprocessing))


def _torchvision_state(raw: Mapping[str, Any], who: str) -> dict[str, np.ndarray]:
    """The state dict as numpy arrays; refuses transformers' layout, naming the converter."""
    state = state_dict_arrays(raw)
    if any(k.startswith(("embedder.embedder.", "resnet.embedder.")) for k in state):
        raise ValueError(
            f"{who}: these are Hugging Face transformers weights (embedder.*, encoder.*); "
            "use rj.weights.from_transformers."
        )
    return state


_TORCHVISION_RANKS = {
    **{n: i for i, n in enumerate(("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"))},
    **{n: i for i, n in enumerate(("weight", "bias", "running_mean", "running_var"))},
    "num_batches_tracked": 4,
    "shortcut": 6,
    "fc": 1000,
    "linear": 1000,
}


def torchvision_order(key: str) -> tuple[int, ...]:
    """Sorts names as torchvision's state_dict() lists them (layer10 after layer9)."""
    ranks = []
    for part in key.split("."):
        layer = re.fullmatch(r"layer(\d+)", part)
        ranks.append(
            10 + int(layer[1])
            if layer
            else int(part)
            if part.isdigit()
            else _TORCHVISION_RANKS.get(part, 999)
        )
    return tuple(ranks)
