"""Weights and checkpoints from outside that cannot be used: one line naming
the file, what it is or holds and what to do; never a traceback, never a
silent wrong result.

Through the library first (rj.weights.from_torchvision / from_transformers /
pretrained, and the functions the commands call: evaluate.load_weights,
evaluate.check_output, finetune.load_variables, finetune.check_init_from),
then through the commands as a user types them (marked slow: each starts
JAX): exit status 2, exactly one line on stderr, nothing written.

The files are real: written with torch.save / safetensors' save_file, then
cut short or overwritten.
"""

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import resnet_jax as rj  # noqa: E402
from resnet_jax import evaluate  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402
from resnet_jax.training import checkpoints, experiment  # noqa: E402
from resnet_jax.training import finetune as ft  # noqa: E402
from resnet_jax.training import workdir as layout  # noqa: E402
from resnet_jax.weights.torch_layout import TorchNeededError, WeightsFileError  # noqa: E402
from tests.helpers import COMPILE_CACHE_ENV, ROOT, tiny_config  # noqa: E402

SAVE = re.escape("save one with torch.save(model.state_dict(), path).")
AGAIN = "delete it and download or save it again."


def resnet8_state(seed=0):
    """A CIFAR resnet8 state dict in torchvision's naming (3x3 stem, option-A
    shortcuts, ``linear``), as numpy arrays: what from_torchvision reads."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv_bn(conv, bn, cout, cin):
        state[f"{conv}.weight"] = rng.normal(0, 0.1, (cout, cin, 3, 3)).astype(np.float32)
        state[f"{bn}.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        state[f"{bn}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
        state[f"{bn}.running_mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
        state[f"{bn}.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)

    conv_bn("conv1", "bn1", 16, 3)
    cin = 16
    for stage, width in enumerate((16, 32, 64), start=1):
        conv_bn(f"layer{stage}.0.conv1", f"layer{stage}.0.bn1", width, cin)
        conv_bn(f"layer{stage}.0.conv2", f"layer{stage}.0.bn2", width, width)
        cin = width
    state["linear.weight"] = rng.normal(0, 0.1, (10, 64)).astype(np.float32)
    state["linear.bias"] = np.zeros(10, np.float32)
    return state


def cut(path, keep=0.5):
    """Truncates ``path`` to ``keep`` of its bytes, as an interrupted download leaves it."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good weights (a .pth and a .safetensors of resnet8) and every bad kind, by name."""
    d = tmp_path_factory.mktemp("weights")
    sd = resnet8_state()
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    torch.save(tensors, d / "good.pth")
    safetensors_numpy.save_file(sd, str(d / "good.safetensors"))
    # 1. Not a state dict.
    torch.save([1, 2, 3], d / "list.pth")
    torch.save(torch.zeros(3), d / "tensor.pth")
    torch.save({"epoch": 3, "arch": "resnet8"}, d / "no_tensors.pth")
    torch.save(torch.nn.Linear(2, 2), d / "module.pth")  # a whole model: weights_only refuses it
    torch.save({"state_dict": tensors, "args": argparse.Namespace(lr=0.1)}, d / "with_args.pth")
    # 3. Not a weights file at all.
    (d / "text.pth").write_text("hello\n")
    (d / "text.safetensors").write_text("hello\n")
    (d / "page.safetensors").write_text("<!DOCTYPE html>\n<html><head><title>model</title>")
    (d / "lfs.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1\n"
    )
    (d / "empty.pth").write_bytes(b"")
    (d / "noise.pth").write_bytes(bytes(range(7, 256)) * 4)
    shutil.copy(d / "good.safetensors", d / "safetensors_named.pth")
    shutil.copy(d / "good.pth", d / "pth_named.safetensors")
    # 4. Cut short: torch's zip archive, its older pickle format, safetensors, a HF folder.
    for name in ("truncated.pth", "truncated_legacy.pth", "truncated.safetensors"):
        if name.endswith(".safetensors"):
            safetensors_numpy.save_file(sd, str(d / name))
        else:
            legacy = {"_use_new_zipfile_serialization": False} if "legacy" in name else {}
            torch.save(tensors, d / name, **legacy)
        cut(d / name)
    hf = d / "hf_truncated"
    hf.mkdir()
    hf_names = {"resnet." + rj.weights.torchvision_to_hf(k): v for k, v in sd.items()}
    safetensors_numpy.save_file(hf_names, str(hf / "model.safetensors"))
    cut(hf / "model.safetensors")
    hf_config = d / "hf_bad_config"
    hf_config.mkdir()
    shutil.copy(d / "good.safetensors", hf_config / "model.safetensors")
    (hf_config / "config.json").write_text('{"hidden_act": "relu",')  # cut short
    return {p.name: str(p) for p in d.iterdir()}


def refused(call, path, fragment, error=WeightsFileError):
    """The one-line message of ``call(path)``, which must name ``path`` and match ``fragment``."""
    with pytest.raises(error) as e:
        call(path)
    message = str(e.value)
    assert "\n" not in message and path in message, message
    assert re.search(fragment, message), message
    return message


# --------------------------------------------------------------------------- #
# 1. A PyTorch file that is not a state dict
# --------------------------------------------------------------------------- #

NOT_A_STATE_DICT = [
    ("list.pth", r"holds a list of 3 items, not a state dict \(tensor names to tensors\): " + SAVE),
    ("tensor.pth", r"holds a single tensor of shape \(3,\), not a state dict"),
    ("no_tensors.pth", r"holds a dict without tensors \(keys 'epoch', 'arch'\), not a state dict"),
    (
        "module.pth",
        r"holds Python objects other than tensors \(the first: torch\.nn\.modules\.linear\.Linear;"
        r" a pickled model.*weights_only=True\) does not load.*torch\.save\(model\.state_dict\(\)",
    ),
    ("with_args.pth", r"holds Python objects other than tensors \(the first: argparse\.Namespace"),
]


@pytest.mark.parametrize("name, fragment", NOT_A_STATE_DICT, ids=[n for n, _ in NOT_A_STATE_DICT])
def test_a_pth_that_is_not_a_state_dict(files, name, fragment):
    message = refused(rj.weights.from_torchvision, files[name], fragment)
    assert message.startswith(f"from_torchvision: {files[name]} ")
    refused(rj.weights.from_transformers, files[name], fragment)  # the same reader


# --------------------------------------------------------------------------- #
# 3. Not a PyTorch / safetensors file at all
# --------------------------------------------------------------------------- #

NOT_A_WEIGHTS_FILE = [
    ("text.pth", r"is text \('hello'\), not a PyTorch file \(what torch\.save writes\)\.$"),
    ("text.safetensors", r"is text \('hello'\), not a safetensors file"),
    ("page.safetensors", r"is an HTML page, not a safetensors file.*/resolve/"),
    ("lfs.safetensors", r"is a Git LFS pointer, not the weights: run `git lfs pull`"),
    ("empty.pth", r"is empty \(0 bytes\), not a PyTorch file: download or save it again\."),
    ("noise.pth", r"is not a PyTorch file: it starts with b'\\x07\\x08.*neither a zip archive"),
    ("safetensors_named.pth", r"is a safetensors file, not a PyTorch file: name it \.safetensors"),
    ("pth_named.safetensors", r"is a PyTorch file, not a safetensors file: name it \.pth"),
]


@pytest.mark.parametrize(
    "name, fragment", NOT_A_WEIGHTS_FILE, ids=[n for n, _ in NOT_A_WEIGHTS_FILE]
)
def test_a_file_that_is_not_weights(files, name, fragment):
    refused(rj.weights.from_torchvision, files[name], fragment)


# --------------------------------------------------------------------------- #
# 4. Truncated files, also in pretrained's download caches
# --------------------------------------------------------------------------- #

TRUNCATED = [
    ("truncated.pth", r"is truncated or damaged \(\d+ bytes; PyTorch: "),
    ("truncated_legacy.pth", r"is truncated or damaged \(\d+ bytes; PyTorch: RuntimeError: "),
    ("truncated.safetensors", r"is truncated or damaged \(\d+ bytes; safetensors: "),
]


@pytest.mark.parametrize("name, fragment", TRUNCATED, ids=[n for n, _ in TRUNCATED])
def test_a_truncated_file(files, name, fragment):
    refused(rj.weights.from_torchvision, files[name], fragment + ".*" + re.escape(AGAIN))


def test_a_truncated_or_malformed_hugging_face_folder(files):
    weights = os.path.join(files["hf_truncated"], "model.safetensors")
    message = refused(rj.weights.from_transformers, files["hf_truncated"], "truncated or damaged")
    assert message.startswith(f"from_transformers: {weights} is truncated") and AGAIN in message
    config = os.path.join(files["hf_bad_config"], "config.json")
    message = refused(rj.weights.from_transformers, files["hf_bad_config"], r"is not JSON \(")
    assert message.startswith(f"from_transformers: {config} is not JSON")


def test_truncated_files_in_the_download_caches(tmp_path, monkeypatch):
    """pretrained names a truncated cached file and says to delete it: a hub file
    cached as a plain file (no symlink to a checksummed blob: not checked
    against the hub's checksum) through the converter's reader, and
    torch.hub's cached .pth through pretrained's own message (kept)."""
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--timm--resnet8.cut"
    commit = "0123456789abcdef" * 2 + "01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    cached = repo / "snapshots" / commit / "model.safetensors"
    safetensors_numpy.save_file(resnet8_state(), str(cached))
    cut(cached)
    with pytest.raises(UserError) as e:
        rj.weights.pretrained(
            "resnet8.cut", source="timm", cache_dir=tmp_path / "hub", preprocessing="cifar"
        )
    assert f"{cached} is truncated or damaged" in str(e.value) and AGAIN in str(e.value)
    # torch.hub's cache: the file is there, so nothing is downloaded (the URL is never asked).
    name = "resnet8-0123abcd.pth"
    torch.save({k: torch.from_numpy(v) for k, v in resnet8_state().items()}, tmp_path / name)
    cut(tmp_path / name)
    with pytest.raises(UserError) as e:
        rj.weights.pretrained("resnet8", weights=f"http://127.0.0.1:9/{name}", cache_dir=tmp_path)
    assert f"{tmp_path / name} (torch.hub's cache) cannot be read" in str(e.value)
    assert "delete it and call again" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- #
# The commands' own functions: the path the user gave, one UserError
# --------------------------------------------------------------------------- #

COMMANDS = [
    ("list.pth", "it holds a list of 3 items, not a state dict"),
    ("module.pth", "it holds Python objects other than tensors"),
    ("text.safetensors", "it is text ('hello'), not a safetensors file"),
    ("truncated.pth", "it is truncated or damaged"),
    ("hf_truncated", "/model.safetensors is truncated or damaged"),
    ("hf_bad_config", "/config.json is not JSON"),
]


@pytest.mark.parametrize("name, says", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_evaluate_and_finetune_name_the_path_given(files, name, says):
    path = files[name]
    with pytest.raises(UserError) as e:
        evaluate.load_weights(path)
    assert str(e.value).startswith(f"--weights {path} cannot be read: ") and says in str(e.value)
    with pytest.raises(UserError) as e:
        ft.load_variables(path)
    assert str(e.value).startswith(f"init_from={path!r} cannot be read: ") and says in str(e.value)


def test_good_files_still_convert(files):
    """The bad files are damaged copies of these."""
    for name in ("good.pth", "good.safetensors"):
        module, variables = rj.weights.from_torchvision(files[name], name="resnet8")
        assert module.num_classes == 10 and module.shortcut == "A"
        assert evaluate.load_weights(files[name])[1] == "torchvision"
        assert ft.load_variables(files[name])[0] == "converted weights"


# --------------------------------------------------------------------------- #
# 5. A damaged init_from checkpoint
# --------------------------------------------------------------------------- #


def saved_workdir(path, steps=(1, 2)):
    """A resnet_jax workdir with checkpoints of ``steps``, saved as the trainer saves them."""
    ckpt = checkpoints.Checkpointer(layout.checkpoints_dir(path), async_save=False)
    rng = np.random.default_rng(0)
    for step in steps:
        state = {
            "step": np.int32(step),
            "params": {
                f"conv{i}": {"kernel": rng.normal(size=(3, 3, 16, 16 * (i + 1))).astype(np.float32)}
                for i in range(6)
            },
            "batch_stats": {"bn": {"mean": np.zeros(64, np.float32)}},
            "opt_state": {"momentum": np.ones((200, 200), np.float32)},
        }
        ckpt.save(step, state, {"fingerprint": {}})
    ckpt.close()
    return str(path)


def _files(folder):
    return sorted(p for p in glob.glob(f"{folder}/**", recursive=True) if os.path.isfile(p))


def _cut_every_file(state):
    for p in _files(state):
        cut(p)


def _cut_the_largest_file(state):
    cut(max(_files(state), key=os.path.getsize))


DAMAGES = {
    "every-file-truncated": _cut_every_file,
    "array-data-truncated": _cut_the_largest_file,
    "metadata-missing": lambda state: os.remove(os.path.join(state, "_METADATA")),
    "state-missing": shutil.rmtree,
}


# orbax's reading threads outlive a failed restore and report a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_init_from_checkpoint_names_its_directory(tmp_path, damage):
    workdir = saved_workdir(tmp_path / "run")
    newest = layout.checkpoints_dir(workdir) / "2"
    DAMAGES[damage](str(newest / "state"))
    before = _files(workdir)
    with pytest.raises(UserError) as e:
        ft.load_variables(workdir)
    message = str(e.value)
    assert "\n" not in message, message
    assert message.startswith(
        f"init_from={workdir!r}: its newest checkpoint, {newest} (step 2), cannot be read ("
    )
    assert "files of it are truncated or missing" in message
    older = "resuming that run in its workdir moves the damaged checkpoint aside and goes on"
    assert f"{older} from step 1." in message
    assert _files(workdir) == before  # read only: nothing moved aside, nothing written
    # The step before is intact, and is not taken in its place.
    shutil.rmtree(newest)
    assert ft.read_checkpoint_variables(workdir)[0] == 1


def test_init_from_is_checked_before_the_workdir_is_created(files, tmp_path):
    """check_init_from: what a fresh start would refuse, refused with nothing
    written (the trainer calls it before it creates the workdir); a workdir
    that resumes reads no init_from."""
    workdir = tmp_path / "new"
    exp = experiment.build_experiment(tiny_config(init_from=files["good.pth"]), str(workdir))

    def check(exp):
        ft.check_init_from(exp.config, exp.workdir, exp.model, exp.abstract_state)

    check(exp)  # resnet8 on 10 classes: the same network

    def init_from(name, exp=exp):
        return dataclasses.replace(exp, config=tiny_config(init_from=files[name]))

    with pytest.raises(UserError, match="truncated.pth' cannot be read: it is truncated"):
        check(init_from("truncated.pth"))
    deeper = experiment.build_experiment(tiny_config(model="resnet14"), str(workdir))
    with pytest.raises(UserError, match="has no params/stage1_block2/bn1/bias"):
        check(init_from("good.pth", deeper))
    assert not workdir.exists()
    saved_workdir(workdir, steps=(1,))
    check(init_from("list.pth"))  # a resume: init_from is ignored, so not read


# --------------------------------------------------------------------------- #
# 6. evaluate --output that could not be written: refused before the evaluation
# --------------------------------------------------------------------------- #


def test_output_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    evaluate.check_output(str(tmp_path / "result.json"))  # a new file in a folder: fine
    missing = tmp_path / "no" / "such" / "result.json"
    with pytest.raises(UserError, match=f"the folder {tmp_path / 'no' / 'such'} does not exist"):
        evaluate.check_output(str(missing))
    (tmp_path / "file").write_text("x")
    for under in ("file/result.json", "file/deeper/result.json"):
        with pytest.raises(UserError, match=f"{tmp_path / 'file'} is a file, not a folder"):
            evaluate.check_output(str(tmp_path / under))
    for folder in (str(tmp_path), str(tmp_path) + "/new/"):
        with pytest.raises(UserError, match="names a folder; give the path of a new file"):
            evaluate.check_output(folder)
    with pytest.raises(UserError, match="exists; results never overwrite a file"):
        evaluate.check_output(str(tmp_path / "file"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: ask os.access as for another user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: p != str(locked) and real(p, mode))
    with pytest.raises(UserError, match=f"the folder {locked} is not writable"):
        evaluate.check_output(str(locked / "result.json"))
    assert sorted(os.listdir(tmp_path)) == ["file", "locked"]  # nothing created


# --------------------------------------------------------------------------- #
# The commands, as a user types them (slow: each starts JAX)
# --------------------------------------------------------------------------- #

# A tiny evaluation and fine-tuning run: mock CIFAR-10, and the digits.
TINY_EVAL = ("--config.mock_data=True", "--config.mock_num_examples=16")
TINY_TRAIN = ("--config.model=resnet8", "--config.num_train_steps=2", "--config.eval_every_steps=2")

# Blocks `import torch`, then runs the module named by argv[1] as `python -m` would.
_WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("No module named 'torch' (blocked by the test)")

    sys.meta_path.insert(0, NoTorch())
    sys.path[0] = ""  # the working directory, as for `python -m`, not this script's folder
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)


def command(*args, without_torch=None):
    """Runs ``args`` (``-m resnet_jax.evaluate ...`` or ``train.py ...``) on 2 CPU devices."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    cache = f"--compilation_cache_dir={os.environ.get(COMPILE_CACHE_ENV, '')}"
    if without_torch is not None:
        without_torch.write_text(_WITHOUT_TORCH)
        args = (str(without_torch), *(a for a in args if a != "-m"))
    cmd = [sys.executable, *args, cache]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def one_line_error(out, prog):
    """Exit status 2, no traceback, and on stderr one line ``PROG: error: ...``:
    the only one for evaluate; for train.py, after its first screen (the
    devices line and the config's warnings), which a run prints before any work."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    if prog == "train.py":
        lines = [ln for ln in lines if not ln.startswith(("JAX ", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), out.stderr[-3000:]
    return lines[0]


def run_evaluate(*args, **kw):
    config = "--config=configs/cifar10.py"
    return command("-m", "resnet_jax.evaluate", config, *TINY_EVAL, *args, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, says",
    [
        ("list.pth", "it holds a list of 3 items, not a state dict"),
        ("truncated.safetensors", "it is truncated or damaged"),
    ],
)
def test_evaluate_with_bad_weights(files, tmp_path, name, says):
    output = tmp_path / "result.json"
    line = one_line_error(
        run_evaluate(f"--weights={files[name]}", f"--output={output}"), "evaluate"
    )
    assert line.startswith(f"evaluate: error: --weights {files[name]} cannot be read: {says}")
    assert not output.exists()


@pytest.mark.slow
def test_evaluate_output_into_a_missing_folder_is_refused_before_evaluating(files, tmp_path):
    output = tmp_path / "results" / "r8.json"
    out = run_evaluate(f"--weights={files['good.safetensors']}", f"--output={output}")
    line = one_line_error(out, "evaluate")
    assert f"the folder {tmp_path / 'results'} does not exist; create it" in line
    assert out.stdout == "" and os.listdir(tmp_path) == []  # nothing evaluated, nothing written


@pytest.mark.slow
def test_evaluate_a_pth_without_torch(files, tmp_path):
    out = run_evaluate(f"--weights={files['good.pth']}", without_torch=tmp_path / "no_torch.py")
    line = one_line_error(out, "evaluate")
    assert line.startswith(f"evaluate: error: --weights {files['good.pth']} cannot be read: it ")
    assert "needs torch (pip install torch)" in line and "A .safetensors file" in line
    # The library: an ImportError, as documented, and a UserError for the commands.
    assert issubclass(TorchNeededError, ImportError) and issubclass(TorchNeededError, UserError)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["text.pth", "damaged-workdir"])
def test_train_init_from_bad_weights(files, tmp_path, bad):
    if bad == "damaged-workdir":
        source = saved_workdir(tmp_path / "pretrained")
        _cut_the_largest_file(str(layout.checkpoints_dir(source) / "2" / "state"))
        says = f"init_from={source!r}: its newest checkpoint, "
    else:
        source, says = files[bad], f"init_from={files[bad]!r} cannot be read: it is text"
    before = _files(source)
    workdir = tmp_path / "finetuned"
    out = command(
        "train.py",
        "--config=configs/finetune.py",
        f"--workdir={workdir}",
        "--noprogress",
        *TINY_TRAIN,
        f"--config.init_from={source}",
    )
    line = one_line_error(out, "train.py")
    assert line.startswith(f"train.py: error: {says}"), line
    assert _files(source) == before  # the source is only read
    assert checkpoints.saved_steps(workdir) == [] and not (workdir / "metrics.jsonl").exists()
    assert not workdir.exists()  # refused before the workdir is created
