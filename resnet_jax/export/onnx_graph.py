"""An ONNX graph written from a function's jaxpr (no jax2onnx, no tf2onnx).

:func:`jaxpr_to_onnx` traces ``fn`` with :func:`jax.make_jaxpr` (the batch
dimension symbolic, so the graph takes any batch) and writes one ONNX node
per primitive, with three passes that a serving runtime would otherwise have
to do:

* **constant folding**: every equation whose inputs are all constants (the
  BatchNorm's ``rsqrt(var + eps) * scale``, the reshapes and broadcasts of the
  parameters, the divisor of an average pool) is evaluated here, with the
  symbolic batch dimension taken as 1 (the constants broadcast along it);
* **layout**: jaxprs are NHWC, ONNX convolutions and pools NCHW. Every value
  carries the permutation in which it is stored, so a stack of convolutions
  and element-wise operations stays NCHW and a ``Transpose`` is written only
  where a consumer needs another order (the input, and the flatten before the
  classifier);
* **BatchNorm folding**: a per-channel ``Sub``/``Mul``/``Add``/``Div`` by a
  constant that follows a ``Conv`` (its only consumer) is folded into the
  convolution's weights and bias, so an inference-mode BatchNorm costs nothing.

The primitives the library's networks use are covered (convolutions, grouped
ones included, pools, element-wise arithmetic, reductions, pads, slices,
concatenation, reshapes, the classifier's ``dot_general``, nested ``jit`` and
``custom_jvp`` calls); any other primitive raises :class:`UnsupportedError`
naming it, never a wrong graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.extend
import numpy as np

OPSET = 17  # ReduceSum takes its axes as an input (13+), ReduceMax as an attribute (< 18)


class UnsupportedError(ValueError):
    """The function uses something this ONNX writer does not translate."""


@dataclass
class _Value:
    """A jaxpr value in the ONNX graph.

    ``const`` (a numpy array in the jaxpr's own layout, the symbolic batch
    dimension as 1) for a constant, else ``name``, the ONNX tensor, stored as
    ``np.transpose(logical, perm)``. ``shape`` is the logical shape the tensor
    has (``None`` for the symbolic dimension; 1 where it still broadcasts).
    """

    shape: tuple
    name: str | None = None
    perm: tuple[int, ...] = ()
    const: np.ndarray | None = None


def _dims(aval_shape: Sequence[Any]) -> tuple:
    return tuple(d if isinstance(d, (int, np.integer)) else None for d in aval_shape)


def _static(shape: Sequence[Any]) -> tuple[int, ...]:
    """The shape with symbolic dimensions as 1 (how constants broadcast along them)."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) else 1 for d in shape)


def _identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


# Element-wise operations: their operands broadcast (ONNX's rules), keep their layout.
_BINARY = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "pow": "Pow",
}
_UNARY = {
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "neg": "Neg",
    "abs": "Abs",
    "sqrt": "Sqrt",
    "erf": "Erf",
}
_PASS = {
    "copy",
    "copy_p",
    "stop_gradient",
    "optimization_barrier",
    "sharding_constraint",
    "reduce_precision",
}
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# What may be evaluated on constants with the symbolic batch dimension as 1:
# operations that treat that dimension element by element.
_FOLDABLE = (
    set(_BINARY)
    | set(_UNARY)
    | _PASS
    | {
        "rsqrt",
        "integer_pow",
        "square",
        "convert_element_type",
        "broadcast_in_dim",
        "reshape",
        "reduce_window_sum",
        "reduce_window_max",
        "pad",
        "squeeze",
        "transpose",
        "rev",
        "slice",
        "concatenate",
        "iota",
    }
)
_ONNX_DTYPES = {
    np.dtype("float32"): 1,
    np.dtype("uint8"): 2,
    np.dtype("int8"): 3,
    np.dtype("int32"): 6,
    np.dtype("int64"): 7,
    np.dtype("bool"): 9,
    np.dtype("float16"): 10,
    np.dtype("float64"): 11,
}


class _Writer:
    def __init__(self):
        import onnx  # the one place that needs it

        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes: list[Any] = []
        self.initializers: dict[str, np.ndarray] = {}
        self._n = 0
        self._const_cache: dict[tuple[int, tuple[int, ...]], str] = {}
        self._keep: list[np.ndarray] = []  # keeps cached constants' ids valid

    # ---- names, nodes and constants ------------------------------------- #

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def node(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def initializer(self, array: np.ndarray, base: str = "const") -> str:
        name = self.fresh(base)
        self.initializers[name] = np.ascontiguousarray(array)
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.initializer(np.asarray(list(values), np.int64), "ints")

    def materialize(self, v: _Value, perm: tuple[int, ...] | None = None) -> str:
        """The ONNX tensor of ``v`` stored in ``perm`` (its own by default)."""
        if v.const is not None:
            arr = v.const
            if perm is not None and arr.ndim == len(perm) and arr.ndim > 1:
                arr = np.transpose(arr, perm)
            key = (id(v.const), tuple(perm or ()))
            if key not in self._const_cache:
                self._keep.append(v.const)
                self._const_cache[key] = self.initializer(arr)
            return self._const_cache[key]
        assert v.name is not None
        if perm is None or tuple(perm) == v.perm:
            return v.name
        return self.node("Transpose", [v.name], perm=[v.perm.index(a) for a in perm])


def _full(v: _Value, aval_shape: Sequence[Any], what: str) -> None:
    """Refuses a value that still broadcasts where ``what`` needs all of it."""
    if v.const is None and tuple(v.shape) != _dims(aval_shape):
        raise UnsupportedError(
            f"{what} of a broadcast value (shape {v.shape}, needed {_dims(aval_shape)})"
        )


def _broadcast_shapes(shapes: Sequence[tuple]) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        if any(d is None for d in dims):
            out.append(None)
        else:
            out.append(max(dims))
    return tuple(out)


def _reduced_perm(perm: tuple[int, ...], removed: Sequence[int]) -> tuple[int, ...]:
    """The storage permutation once the logical axes ``removed`` are gone."""
    keep = [a for a in range(len(perm)) if a not in removed]
    renumber = {a: i for i, a in enumerate(keep)}
    return tuple(renumber[a] for a in perm if a not in removed)


class _Converter:
    def __init__(self, writer: _Writer):
        self.w = writer

    # ---- evaluation ------------------------------------------------------ #

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[_Value]) -> list[_Value]:
        env: dict[Any, _Value] = {}

        def read(atom: Any) -> _Value:
            if isinstance(atom, jax.extend.core.Literal):
                val = np.asarray(atom.val)
                return _Value(shape=val.shape, const=val)
            return env[atom]

        for var, c in zip(jaxpr.constvars, consts, strict=True):
            arr = np.asarray(c)
            env[var] = _Value(shape=arr.shape, const=arr)
        for var, a in zip(jaxpr.invars, args, strict=True):
            env[var] = a
        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            outs = self.equation(eqn, ins)
            for var, o in zip(eqn.outvars, outs, strict=True):
                env[var] = o
        return [read(a) for a in jaxpr.outvars]

    def equation(self, eqn: Any, ins: list[_Value]) -> list[_Value]:
        name = eqn.primitive.name
        for key in _CALLS:
            if key in eqn.params and name not in ("cond", "while", "scan"):
                inner = eqn.params[key]
                closed = inner if hasattr(inner, "consts") else None
                body = closed.jaxpr if closed is not None else inner
                return self.run(body, closed.consts if closed is not None else (), ins)
        if all(v.const is not None for v in ins) and name in _FOLDABLE:
            return self.fold(eqn, ins)
        handler = getattr(self, f"op_{name}", None)
        if handler is None:
            if name in _BINARY:
                handler = self.binary
            elif name in _UNARY:
                handler = self.unary
            elif name in _PASS:
                return [ins[0]]
            else:
                raise UnsupportedError(f"the primitive {name!r} has no ONNX translation here")
        out = handler(eqn, *ins)
        return [out]

    def fold(self, eqn: Any, ins: list[_Value]) -> list[_Value]:
        params = dict(eqn.params)
        if "shape" in params:
            params["shape"] = _static(params["shape"])
        if "new_sizes" in params:
            if any(not isinstance(d, (int, np.integer)) for d in params["new_sizes"]):
                raise UnsupportedError("a reshape of a constant to a batch-dependent shape")
            params["new_sizes"] = tuple(int(d) for d in params["new_sizes"])
        with jax.default_device(jax.devices("cpu")[0]):
            out = eqn.primitive.bind(*[v.const for v in ins], **params)
        outs = out if eqn.primitive.multiple_results else [out]
        return [_Value(shape=np.shape(o), const=np.asarray(o)) for o in outs]

    # ---- element-wise ----------------------------------------------------- #

    def _common(self, ins: Sequence[_Value]) -> tuple[tuple[int, ...], list[str]]:
        rank = max(len(v.shape) for v in ins)
        live = [v for v in ins if v.const is None and len(v.shape) == rank]
        perm = live[0].perm if live else _identity(rank)
        names = []
        for v in ins:
            if v.const is None and len(v.shape) != rank:
                raise UnsupportedError("an element-wise operation on values of different ranks")
            names.append(self.w.materialize(v, perm if len(v.shape) == rank else None))
        return perm, names

    def binary(self, eqn: Any, a: _Value, b: _Value) -> _Value:
        name = eqn.primitive.name
        perm, (na, nb) = self._common([a, b])
        shape = _broadcast_shapes([a.shape, b.shape])
        if name == "max":
            for live, other in ((na, b), (nb, a)):
                if other.const is not None and not np.any(other.const):
                    return _Value(shape, self.w.node("Relu", [live]), perm)
        return _Value(shape, self.w.node(_BINARY[name], [na, nb]), perm)

    def unary(self, eqn: Any, x: _Value) -> _Value:
        return _Value(x.shape, self.w.node(_UNARY[eqn.primitive.name], [x.name]), x.perm)

    def op_rsqrt(self, eqn: Any, x: _Value) -> _Value:
        return _Value(x.shape, self.w.node("Reciprocal", [self.w.node("Sqrt", [x.name])]), x.perm)

    def op_square(self, eqn: Any, x: _Value) -> _Value:
        return _Value(x.shape, self.w.node("Mul", [x.name, x.name]), x.perm)

    def op_integer_pow(self, eqn: Any, x: _Value) -> _Value:
        y = int(eqn.params["y"])
        if y == 2:
            return self.op_square(eqn, x)
        exponent = self.w.initializer(np.asarray(float(y), np.float32))
        return _Value(x.shape, self.w.node("Pow", [x.name, exponent]), x.perm)

    def op_convert_element_type(self, eqn: Any, x: _Value) -> _Value:
        dtype = np.dtype(eqn.params["new_dtype"])
        if dtype not in _ONNX_DTYPES:
            raise UnsupportedError(f"a conversion to {dtype}")
        return _Value(x.shape, self.w.node("Cast", [x.name], to=_ONNX_DTYPES[dtype]), x.perm)

    # ---- shapes ------------------------------------------------------------ #

    def op_broadcast_in_dim(self, eqn: Any, x: _Value) -> _Value:
        shape = eqn.params["shape"]
        dims = eqn.params["broadcast_dimensions"]
        rank = len(shape)
        if len(x.shape) == rank:
            return x  # ONNX broadcasts the 1s where it is used
        # The new axes go last in storage: x keeps its layout (an NCHW-stored
        # (N, C) stays as it is and becomes (N, C, 1, 1)).
        new = [i for i in range(rank) if i not in dims]
        out_shape = [1] * rank
        for src, dst in enumerate(dims):
            out_shape[dst] = x.shape[src]
        perm = tuple(dims[p] for p in x.perm) + tuple(new)
        axes = list(range(len(x.shape), rank))
        out = self.w.node("Unsqueeze", [self.w.materialize(x), self.w.ints(axes)])
        return _Value(tuple(out_shape), out, perm)

    def op_reshape(self, eqn: Any, x: _Value) -> _Value:
        if eqn.params.get("dimensions") is not None:
            raise UnsupportedError("a reshape with a dimension order")
        _full(x, eqn.invars[0].aval.shape, "a reshape")
        sizes = eqn.params["new_sizes"]
        symbolic = [i for i, d in enumerate(sizes) if not isinstance(d, (int, np.integer))]
        if len(symbolic) > 1:
            raise UnsupportedError("a reshape to a shape with two batch-dependent dimensions")
        target = [-1 if i in symbolic else int(d) for i, d in enumerate(sizes)]
        name = self.w.materialize(x, _identity(len(x.shape)))
        out = self.w.node("Reshape", [name, self.w.ints(target)])
        return _Value(_dims(sizes), out, _identity(len(sizes)))

    def op_squeeze(self, eqn: Any, x: _Value) -> _Value:
        dims = tuple(eqn.params["dimensions"])
        stored = [x.perm.index(d) for d in dims]
        out = self.w.node("Squeeze", [x.name, self.w.ints(stored)])
        shape = tuple(d for i, d in enumerate(x.shape) if i not in dims)
        return _Value(shape, out, _reduced_perm(x.perm, dims))

    def op_transpose(self, eqn: Any, x: _Value) -> _Value:
        permutation = tuple(eqn.params["permutation"])
        inv = _inverse(permutation)
        shape = tuple(x.shape[p] for p in permutation)
        return _Value(shape, x.name, tuple(inv[p] for p in x.perm))

    def op_concatenate(self, eqn: Any, *xs: _Value) -> _Value:
        dim = int(eqn.params["dimension"])
        for v, var in zip(xs, eqn.invars, strict=True):
            _full(v, var.aval.shape, "a concatenation")
        if any(
            v.const is not None and v.const.shape != _static(var.aval.shape)
            for v, var in zip(xs, eqn.invars, strict=True)
        ):
            raise UnsupportedError("a concatenation with a batch-broadcast constant")
        perm, names = self._common(xs)
        return _Value(
            _dims(eqn.outvars[0].aval.shape),
            self.w.node("Concat", names, axis=perm.index(dim)),
            perm,
        )

    def op_pad(self, eqn: Any, x: _Value, value: _Value) -> _Value:
        config = eqn.params["padding_config"]
        if value.const is None:
            raise UnsupportedError("a pad with a computed padding value")
        if any(lo < 0 or hi < 0 or interior for lo, hi, interior in config):
            raise UnsupportedError("a pad with negative or interior padding")
        _full(x, eqn.invars[0].aval.shape, "a pad")
        lo = [int(config[a][0]) for a in x.perm]
        hi = [int(config[a][1]) for a in x.perm]
        fill = self.w.initializer(np.asarray(value.const, value.const.dtype).reshape(()))
        out = self.w.node("Pad", [x.name, self.w.ints(lo + hi), fill], mode="constant")
        return _Value(_dims(eqn.outvars[0].aval.shape), out, x.perm)

    def op_slice(self, eqn: Any, x: _Value) -> _Value:
        _full(x, eqn.invars[0].aval.shape, "a slice")
        start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params["strides"] or (1,) * len(start)
        shape = eqn.invars[0].aval.shape
        axes, starts, ends, steps = [], [], [], []
        for a in range(len(start)):
            if int(start[a]) == 0 and limit[a] is shape[a] and int(strides[a]) == 1:
                continue  # the whole axis (the symbolic batch among them)
            if not isinstance(limit[a], (int, np.integer)):
                raise UnsupportedError("a slice of part of the batch")
            axes.append(x.perm.index(a))
            starts.append(int(start[a]))
            ends.append(int(limit[a]))
            steps.append(int(strides[a]))
        if not axes:
            return x
        ins = [
            x.name,
            self.w.ints(starts),
            self.w.ints(ends),
            self.w.ints(axes),
            self.w.ints(steps),
        ]
        return _Value(_dims(eqn.outvars[0].aval.shape), self.w.node("Slice", ins), x.perm)

    def op_rev(self, eqn: Any, x: _Value) -> _Value:
        dims = tuple(eqn.params["dimensions"])
        axes = [x.perm.index(d) for d in dims]
        n = len(axes)
        big = np.iinfo(np.int64).min
        ins = [
            x.name,
            self.w.ints([-1] * n),
            self.w.ints([big] * n),
            self.w.ints(axes),
            self.w.ints([-1] * n),
        ]
        return _Value(x.shape, self.w.node("Slice", ins), x.perm)

    # ---- reductions, pools, convolutions, matrix products ------------------ #

    def _reduce(self, eqn: Any, x: _Value, op: str) -> _Value:
        axes = tuple(eqn.params["axes"])
        _full(x, eqn.invars[0].aval.shape, "a reduction")
        stored = [x.perm.index(a) for a in axes]
        if op == "ReduceSum":
            out = self.w.node(op, [x.name, self.w.ints(stored)], keepdims=0)
        else:
            out = self.w.node(op, [x.name], axes=stored, keepdims=0)
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return _Value(shape, out, _reduced_perm(x.perm, axes))

    def op_reduce_sum(self, eqn: Any, x: _Value) -> _Value:
        return self._reduce(eqn, x, "ReduceSum")

    def op_reduce_max(self, eqn: Any, x: _Value) -> _Value:
        return self._reduce(eqn, x, "ReduceMax")

    def op_reduce_min(self, eqn: Any, x: _Value) -> _Value:
        return self._reduce(eqn, x, "ReduceMin")

    def _pool(self, eqn: Any, x: _Value, op: str) -> _Value:
        p = eqn.params
        window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"])):
            raise UnsupportedError("a dilated pool")
        rank = len(window)
        busy = {
            a
            for a in range(rank)
            if window[a] != 1 or strides[a] != 1 or tuple(padding[a]) != (0, 0)
        }
        if rank == 4 and busy <= {1, 2}:
            pooled, channels = [1, 2], 3  # NHWC
        elif rank == 4 and busy <= {2, 3}:
            pooled, channels = [2, 3], 1  # NCHW
        else:
            raise UnsupportedError("a pool over other than the two spatial axes of an image batch")
        _full(x, eqn.invars[0].aval.shape, "a pool")
        perm = (0, channels, *pooled)
        name = self.w.materialize(x, perm)
        attrs = dict(
            kernel_shape=[int(window[a]) for a in pooled],
            strides=[int(strides[a]) for a in pooled],
            pads=[int(padding[a][0]) for a in pooled] + [int(padding[a][1]) for a in pooled],
        )
        if op == "AveragePool":
            out = self.w.node("AveragePool", [name], count_include_pad=1, **attrs)
            size = float(np.prod([window[a] for a in pooled]))
            out = self.w.node("Mul", [out, self.w.initializer(np.asarray(size, np.float32))])
        else:
            out = self.w.node("MaxPool", [name], **attrs)
        return _Value(_dims(eqn.outvars[0].aval.shape), out, perm)

    def op_reduce_window_max(self, eqn: Any, x: _Value) -> _Value:
        return self._pool(eqn, x, "MaxPool")

    def op_reduce_window_sum(self, eqn: Any, x: _Value) -> _Value:
        return self._pool(eqn, x, "AveragePool")

    def op_conv_general_dilated(self, eqn: Any, x: _Value, k: _Value) -> _Value:
        p = eqn.params
        dn = p["dimension_numbers"]
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise UnsupportedError("a transposed or batch-grouped convolution")
        if k.const is None:
            raise UnsupportedError("a convolution with computed weights")
        _full(x, eqn.invars[0].aval.shape, "a convolution")
        lhs = self.w.materialize(x, tuple(dn.lhs_spec))
        kernel = np.transpose(k.const, tuple(dn.rhs_spec))
        padding = p["padding"]
        out = self.w.node(
            "Conv",
            [lhs, self.w.initializer(kernel, "kernel")],
            strides=[int(s) for s in p["window_strides"]],
            dilations=[int(d) for d in p["rhs_dilation"]],
            pads=[int(lo) for lo, _ in padding] + [int(hi) for _, hi in padding],
            group=int(p["feature_group_count"]),
            kernel_shape=list(kernel.shape[2:]),
        )
        return _Value(_dims(eqn.outvars[0].aval.shape), out, tuple(dn.out_spec))

    def op_dot_general(self, eqn: Any, x: _Value, w: _Value) -> _Value:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb or w.const is None or w.const.ndim != 2 or tuple(lc) != (len(x.shape) - 1,):
            raise UnsupportedError("a matrix product other than a dense layer's")
        _full(x, eqn.invars[0].aval.shape, "a dense layer")
        weight = w.const if tuple(rc) == (0,) else w.const.T
        name = self.w.materialize(x, _identity(len(x.shape)))
        out = self.w.node("MatMul", [name, self.w.initializer(weight, "dense")])
        return _Value(_dims(eqn.outvars[0].aval.shape), out, _identity(len(x.shape)))


# --------------------------------------------------------------------------- #
# BatchNorm folding
# --------------------------------------------------------------------------- #


def _fold_affine_into_conv(
    nodes: list[Any], inits: dict[str, np.ndarray], outputs: set[str]
) -> list[Any]:
    """Folds per-channel constant Sub/Mul/Add/Div after a Conv into the Conv."""
    changed = True
    while changed:
        changed = False
        consumers: dict[str, list[Any]] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for conv in nodes:
            if conv.op_type != "Conv" or conv.output[0] in outputs:
                continue
            users = consumers.get(conv.output[0], [])
            if len(users) != 1 or users[0].op_type not in ("Sub", "Mul", "Add", "Div"):
                continue
            user = users[0]
            if user.input[0] != conv.output[0] or user.input[1] not in inits:
                continue
            c = inits[user.input[1]]
            weight = inits[conv.input[1]]
            out_ch = weight.shape[0]
            if c.ndim > 4 or c.size not in (1, out_ch):
                continue
            if c.size == out_ch and c.ndim >= 3 and c.shape[-3] != out_ch:
                continue  # not along the channel axis of NCHW
            if c.size == out_ch and c.ndim < 3:
                continue
            vec = np.broadcast_to(c.reshape(-1), (out_ch,)).astype(np.float32)
            bias = inits[conv.input[2]] if len(conv.input) > 2 else np.zeros(out_ch, np.float32)
            if user.op_type == "Sub":
                bias = bias - vec
            elif user.op_type == "Add":
                bias = bias + vec
            elif user.op_type == "Mul":
                weight, bias = weight * vec[:, None, None, None], bias * vec
            else:
                weight, bias = weight / vec[:, None, None, None], bias / vec
            inits[conv.input[1]] = weight.astype(np.float32)
            bias_name = conv.input[2] if len(conv.input) > 2 else conv.input[1] + "_bias"
            inits[bias_name] = bias.astype(np.float32)
            del conv.input[2:]
            conv.input.append(bias_name)
            conv.output[0] = user.output[0]
            nodes.remove(user)
            changed = True
            break
    return nodes


def _prune(nodes: list[Any], inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    used = {i for n in nodes for i in n.input}
    return {k: v for k, v in inits.items() if k in used}


# --------------------------------------------------------------------------- #
# The entry point
# --------------------------------------------------------------------------- #


def jaxpr_to_onnx(
    fn: Callable[[jax.Array], jax.Array],
    input_shape: Sequence[int],
    input_dtype: Any = np.float32,
    *,
    batch_size: int | None = None,
    input_name: str = "images",
    output_name: str = "logits",
    fold_batchnorm: bool = True,
    doc: str = "",
) -> Any:
    """The ONNX ``ModelProto`` of ``fn`` on one ``input_shape`` array (NHWC, the
    batch dimension first; its size is ignored).

    ``batch_size=None`` makes the batch dynamic (the graph input's first
    dimension is named ``batch``); an int fixes it. ``fn`` returns one array.

    Raises:
      UnsupportedError: a primitive or a form of one that is not translated.
      ImportError: the ``onnx`` package is not installed.
    """
    writer = _Writer()
    onnx, helper = writer.onnx, writer.helper
    dims = tuple(int(d) for d in input_shape[1:])
    if batch_size is None:
        (batch,) = jax.export.symbolic_shape("batch")
    else:
        batch = int(batch_size)
    spec = jax.ShapeDtypeStruct((batch, *dims), input_dtype)
    closed = jax.make_jaxpr(fn)(spec)
    if len(closed.jaxpr.outvars) != 1:
        raise UnsupportedError("a function with more than one output")
    rank = len(dims) + 1
    arg = _Value(
        shape=(None if batch_size is None else batch, *dims), name=input_name, perm=_identity(rank)
    )
    (out,) = _Converter(writer).run(closed.jaxpr, closed.consts, [arg])
    out_aval = closed.jaxpr.outvars[0].aval
    if out.const is not None:
        raise UnsupportedError("a function whose output does not depend on its input")
    _full(out, out_aval.shape, "the output")
    final = writer.materialize(out, _identity(len(out.shape)))
    writer.nodes.append(helper.make_node("Identity", [final], [output_name]))
    nodes = writer.nodes
    inits = writer.initializers
    if fold_batchnorm:
        nodes = _fold_affine_into_conv(nodes, inits, {output_name})
    inits = _prune(nodes, inits)
    batch_dim = "batch" if batch_size is None else int(batch_size)
    x_info = helper.make_tensor_value_info(
        input_name, _ONNX_DTYPES[np.dtype(input_dtype)], [batch_dim, *dims]
    )
    y_info = helper.make_tensor_value_info(
        output_name,
        _ONNX_DTYPES[np.dtype(out_aval.dtype)],
        [batch_dim if not isinstance(d, (int, np.integer)) else int(d) for d in out_aval.shape],
    )
    graph = helper.make_graph(
        nodes,
        "resnet_jax",
        [x_info],
        [y_info],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
        doc_string=doc,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="resnet_jax"
    )
    model.ir_version = 8  # what onnxruntime >= 1.14 and TensorRT 8.6+ read for opset 17
    onnx.checker.check_model(model)
    return model
