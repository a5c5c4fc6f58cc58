"""The codebase's structure, as the layout promises it (docs/index.md, issue 19):
no import cycle, first-party imports at module level, lazy third-party imports
only where a reason is given, no private name used outside its module, and
what each subpackage needs to import."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import COMPILE_CACHE_ENV, ROOT

PACKAGE = pathlib.Path(ROOT) / "resnet_jax"
# Imported inside functions, each with its reason on the line: heavy frameworks
# (TensorFlow, torch, keras), what `import resnet_jax` must not need
# (safetensors, huggingface_hub, timm), and scikit-learn (slow to import, and
# needed by the digits only).
LAZY_ALLOWED = (
    "sklearn",
    "tensorflow",
    "tensorflow_datasets",
    "torch",
    "keras",
    "safetensors",
    "huggingface_hub",
    "timm",
    "onnx",
    "jax.experimental",  # jax2tf, which imports TensorFlow
)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str | None, level: int, here: str) -> str | None:
    if level:  # relative imports are not used, but resolve them anyway
        base = here.split(".")[: len(here.split(".")) - level + (1 if _is_package(here) else 0)]
        module = ".".join(base + ([module] if module else []))
    return module


def _first_party_targets(node: ast.AST, here: str) -> list[str]:
    """The resnet_jax modules an import statement loads by name."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(node.module, node.level, here)
        targets = [
            f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
        ]
    return [t for t in targets if t and t.split(".")[0] == "resnet_jax" and t in MODULES]


def _top_level_imports(tree: ast.Module) -> list[ast.AST]:
    """Imports that run when the module is imported (not inside functions)."""
    out, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
    return out


def import_graph() -> dict[str, set[str]]:
    """resnet_jax module -> the resnet_jax modules it imports at import time."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for node in _top_level_imports(tree):
            edges.update(_first_party_targets(node, name))
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 40  # the graph was read
    assert find_cycle(graph) is None


def _has_reason(lines: list[str], i: int) -> bool:
    """A comment on import line ``i`` or on the line above its block of imports."""
    while True:
        if "#" in lines[i]:
            return True
        i -= 1
        if i < 0 or not lines[i].strip().startswith(("import ", "from ", "#")):
            return False
        if lines[i].strip().startswith("#"):
            return True


def _function_imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    yield sub


@pytest.mark.parametrize("path", [*MODULES.values(), pathlib.Path(ROOT) / "train.py"], ids=str)
def test_imports_inside_functions_are_third_party_with_a_reason(path):
    source = path.read_text()
    lines = source.splitlines()
    here = next((n for n, p in MODULES.items() if p == path), "train")
    for node in _function_imports(ast.parse(source)):
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        first_party = _first_party_targets(node, here) if here != "train" else []
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert not first_party and not any(n.startswith("resnet_jax") for n in names), (
            f"{where}: first-party imports go at module level"
        )
        assert all(n.split(".")[0] in LAZY_ALLOWED or n in LAZY_ALLOWED for n in names), (
            f"{where}: {names} imported inside a function; import it at module level"
        )
        assert _has_reason(lines, node.lineno - 1), f"{where}: a lazy import says why"


def _module_aliases(tree: ast.Module, here: str) -> dict[str, str]:
    """Local names bound to resnet_jax modules (``from resnet_jax import data as d``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "resnet_jax"
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, here)
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
    return aliases


def private_uses(path: pathlib.Path, here: str | None) -> list[str]:
    """``module._name`` and ``from module import _name`` of another resnet_jax module."""
    tree = ast.parse(path.read_text())
    aliases = _module_aliases(tree, here or "")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _resolve(node.module, node.level, here or ""):
            base = _resolve(node.module, node.level, here or "")
            if base in MODULES and base != here:
                found += [
                    f"{base}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__"):
                continue
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases and aliases[value.id] != here:
                found.append(".".join([aliases[value.id], *reversed(chain)]))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [f"{shown}: {f}" for f in found]


def test_the_private_name_finder_finds_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from resnet_jax import data as d\nfrom resnet_jax.training.steps import _x\nd._tfds()\n"
    )
    assert sorted(private_uses(probe, None)) == [
        "probe.py: resnet_jax.data._tfds",
        "probe.py: resnet_jax.training.steps._x",
    ]


def test_no_private_name_is_used_outside_its_module():
    root = pathlib.Path(ROOT)
    files = [(p, n) for n, p in MODULES.items()]
    for folder in ("tests", "benchmarks", "experiments", "configs"):
        files += [(p, None) for p in sorted((root / folder).rglob("*.py"))]
    files.append((root / "train.py", None))
    found = [use for path, here in files for use in private_uses(path, here)]
    assert not found, "\n".join(found)


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
"""


def _run_blocked(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    program = f"BLOCKED = {blocked!r}\n" + BLOCKER + code
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if os.environ.get(COMPILE_CACHE_ENV):  # the session's cache: each program compiles once
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ[COMPILE_CACHE_ENV]
    return subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_import_resnet_jax_needs_jax_and_flax_only():
    blocked = (
        "tensorflow",
        "tensorflow_datasets",
        "torch",
        "keras",
        "orbax",
        "optax",
        "ml_collections",
        "sklearn",
        "safetensors",
        "huggingface_hub",
        "timm",
        "transformers",
        "etils",
    )
    code = (
        "import jax, jax.numpy as jnp\n"
        "import resnet_jax as rj\n"
        "m = rj.create_model('resnet8')\n"
        "v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))\n"
        "x = rj.weights.preprocess(jnp.zeros((40, 48, 3)), 'torchvision-v2')\n"
        "assert x.shape == (224, 224, 3) or x.ndim == 3, x.shape\n"
        "print('ok')\n"
    )
    # torchvision-v2 resizes to 232 and crops 224: the 40x48 image is enlarged.
    out = _run_blocked(blocked, code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_pure_steps_import_without_orbax_or_tensorflow():
    code = (
        "import jax, jax.numpy as jnp, optax\n"
        "import resnet_jax as rj\n"
        "from resnet_jax.training import steps\n"
        "m = rj.create_model('resnet8')\n"
        "v = m.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))\n"
        "s = steps.TrainState.create(apply_fn=m.apply, params=v['params'],\n"
        "    batch_stats=v['batch_stats'], tx=optax.sgd(0.1))\n"
        "batch = {'image': jnp.zeros((2, 32, 32, 3)), 'label': jnp.zeros((2,), jnp.int32)}\n"
        "step = jax.jit(lambda s, b: steps.train_step(\n"
        "    s, b, learning_rate_fn=lambda t: 0.1, num_classes=10))\n"
        "s, metrics = step(s, batch)\n"
        "assert int(s.step) == 1\n"
        "print('ok')\n"
    )
    out = _run_blocked(("orbax", "tensorflow", "tensorflow_datasets"), code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_run_reads_data_and_writes_tensorboard_without_importing_keras(tmp_path):
    """TensorFlow's eager import of Keras's optimizers (with scikit-learn) is
    skipped; the scalars are in the events file, and Keras still imports
    afterwards."""
    code = f"""
import os, sys
from etils import epath
from resnet_jax.data import tf_setup
from resnet_jax.training import runtime
tf = tf_setup.tensorflow_module()
tfds = tf_setup.tfds_module()
w = runtime.TensorBoardWriter(epath.Path({str(tmp_path)!r}), remote=False)
w.write_scalars(3, {{"train_loss": 1.5}})
w.close()
print(sorted(m for m in ("keras", "sklearn", "tf_keras") if m in sys.modules))
(events,) = os.listdir({str(tmp_path)!r})
it = tf.compat.v1.train.summary_iterator(os.path.join({str(tmp_path)!r}, events))
print([(e.step, v.tag, float(tf.make_ndarray(v.tensor))) for e in it for v in e.summary.value])
import keras.src.optimizers
print(keras.optimizers.SGD.__name__)
"""
    out = _run_blocked((), code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["[]", "[(3, 'train_loss', 1.5)]", "SGD"], out.stdout


@pytest.mark.slow
def test_the_wheel_holds_every_module(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
        + [str(tmp_path), ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("resnet_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for p in MODULES.values()}
    assert expected <= names, sorted(expected - names)


def test_a_passed_tests_temporary_files_go_when_it_ends(pytestconfig):
    # Exported ResNet-50s, profiler traces and checkpoints: kept for every test
    # of the last three sessions, they took 3.4 to 5.3 GB a session, and stop
    # 36's CI ran out of disk.
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) <= 1
