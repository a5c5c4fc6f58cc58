"""rj.weights.pretrained against a local hub and a local file server on 127.0.0.1 (no internet).

``LocalHub`` answers what huggingface_hub asks of the Hugging Face hub:
``HEAD``/``GET /{repo}/resolve/{revision}/{filename}``, small files with
their git blob sha1 as ``ETag``, LFS files (the weights) as a redirect to a
storage server on another port carrying ``X-Linked-Etag`` (their sha256) and
``X-Linked-Size``, every answer with ``X-Repo-Commit``, and the hub's
``X-Error-Code`` for a missing repo, revision or file. The files are real
(random weights): a torchvision resnet18 ``.pth`` named by its sha256 as
torch.hub names files, a timm repo (``model.safetensors`` in torchvision's
layout, ``config.json`` with its ``pretrained_cfg``) and a transformers repo
made by ``save_pretrained`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``). Servers log every request, so a cached call
can be seen to make none. The hub's cache is a ``tmp_path`` folder
(``cache_dir=``, or huggingface_hub's ``HF_HUB_CACHE`` constant), torch.hub's
``TORCH_HOME`` too; ``HF_HUB_OFFLINE`` is set on huggingface_hub's constants
module (which reads the environment at import), the environment variables
themselves in a subprocess.
"""

import hashlib
import http.server
import importlib
import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse

import jax
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax.errors import UserError

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = importlib.import_module("huggingface_hub.constants")
# The module: rj.weights.pretrained is the function it defines.
module = importlib.import_module("resnet_jax.weights.pretrained")

PUBLISHED_R18 = "resnet18-f37072fd.pth"  # torchvision's file name: not our random weights


def git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_of(files):
    """A commit hash for a set of files (name -> bytes)."""
    listing = json.dumps(sorted((n, git_sha1(b)) for n, b in files.items()))
    return hashlib.sha1(listing.encode()).hexdigest()


class Server(http.server.ThreadingHTTPServer):
    """Serves ``routes[path] = (status, headers, body)``, else ``answer``; logs (method, path)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.routes, self.requests = {}, []

    def handle_error(self, request, client_address):
        """A client that hangs up is expected: no trace."""

    def answer(self, method, path):
        return 404, {}, b"not found"

    def start(self):
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


class LocalHub(Server):
    """The hub's ``resolve`` answers for ``repos[repo] = {'refs': {...}, 'commits': {...}}``."""

    def __init__(self):
        super().__init__()
        self.repos, self.gated = {}, set()
        self.storage = Server().start()  # another origin, as the hub's LFS storage
        self.on_answer = (
            None  # called with (method, path) once an answer is chosen, before it is sent
        )

    def stop(self):
        super().stop()
        self.storage.stop()

    def add(self, repo, files, refs=("main",)):
        """The repo's commit of ``files`` (name -> bytes, or a folder), under ``refs``."""
        if not isinstance(files, dict):
            files = {f.name: f.read_bytes() for f in sorted(files.iterdir())}
        commit = commit_of(files)
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        entry["commits"][commit] = files
        entry["refs"].update(dict.fromkeys(refs, commit))
        for body in files.values():
            sha = hashlib.sha256(body).hexdigest()
            self.storage.routes[f"/blobs/{sha}"] = (200, {}, body)
        return commit

    def answer(self, method, path):
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None:
            return 404, {}, b"not found"
        repo, revision = m[1], urllib.parse.unquote(m[2])
        filename = urllib.parse.unquote(m[3])
        if repo not in self.repos:  # the hub answers 401 for a repo it does not show
            return 401, {"X-Error-Code": "RepoNotFound"}, b"Repository not found"
        if repo in self.gated:
            return 403, {"X-Error-Code": "GatedRepo"}, b"Access to this repo is restricted"
        entry = self.repos[repo]
        commit = entry["refs"].get(revision, revision)
        if commit not in entry["commits"]:
            return 404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id"
        headers = {"X-Repo-Commit": commit}
        body = entry["commits"][commit].get(filename)
        if body is None:
            return 404, {**headers, "X-Error-Code": "EntryNotFound"}, b"Entry not found"
        if filename.endswith(".json"):  # kept in git: the git blob sha1
            return 200, {**headers, "ETag": f'"{git_sha1(body)}"'}, body
        sha = hashlib.sha256(body).hexdigest()
        return (
            302,
            {
                **headers,
                "Location": f"{self.storage.url}/blobs/{sha}",
                "ETag": f'"{sha}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(body)),
            },
            b"",
        )


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.reply(with_body=True)

    def do_HEAD(self):
        self.reply(with_body=False)

    def reply(self, with_body):
        server = self.server
        server.requests.append((self.command, self.path))
        route = server.routes.get(self.path)
        status, headers, body = route or server.answer(self.command, self.path)
        if getattr(server, "on_answer", None):
            server.on_answer(self.command, self.path)
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    s = LocalHub().start()
    yield s
    s.stop()


@pytest.fixture
def server():
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The published files: a torchvision .pth, a transformers repo folder, a timm repo folder."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    pth = buffer.getvalue()
    name = f"resnet18-{hashlib.sha256(pth).hexdigest()[:10]}.pth"  # torch.hub's convention
    (root / name).write_bytes(pth)

    hf = root / "hf"
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic"
    )
    config.num_labels = 3
    transformers.ResNetForImageClassification(config).save_pretrained(hf)
    processor = {"size": {"shortest_edge": 224}, "crop_pct": 0.9, "resample": 2}
    (hf / "preprocessor_config.json").write_text(json.dumps(processor))

    timm_dir = root / "timm"
    timm_dir.mkdir()
    safetensors_torch.save_file(sd, timm_dir / "model.safetensors")
    cfg = {"input_size": [3, 224, 224], "crop_pct": 0.95, "interpolation": "bicubic"}
    timm_config = {"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": cfg}
    (timm_dir / "config.json").write_text(json.dumps(timm_config))
    return {"pth": root / name, "hf": hf, "timm": timm_dir}


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as huggingface_hub read it at import."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def assert_same(a, b):
    (ma, va), (mb, vb) = a, b
    assert ma == mb and a.preprocessing == b.preprocessing
    flat_a, flat_b = jax.tree.leaves_with_path(va), jax.tree.leaves_with_path(vb)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(flat_a, flat_b))


def one_line_error(call, *args, **kwargs):
    with pytest.raises(UserError) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.startswith("pretrained: ")
    return message


def snapshot(cache, repo, commit):
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


# --------------------------------------------------------------------------- #
# torchvision: torch.hub.
# --------------------------------------------------------------------------- #


def test_torchvision_download_convert_then_cache(server, files, tmp_path):
    pth = files["pth"]
    server.routes[f"/models/{pth.name}"] = (200, {}, pth.read_bytes())
    url = f"{server.url}/models/{pth.name}"
    got = rj.weights.pretrained("resnet18", source="torchvision", weights=url, cache_dir=tmp_path)
    assert_same(got, rj.weights.from_torchvision(pth, name="resnet18"))
    assert got.module.num_classes == 10 and server.requests == [("GET", f"/models/{pth.name}")]
    assert (tmp_path / pth.name).read_bytes() == pth.read_bytes()  # cache_dir is model_dir
    assert os.listdir(tmp_path) == [pth.name]  # no temporary file left
    # Cached: no request; options reach the converter.
    headless = rj.weights.pretrained("resnet18", weights=url, cache_dir=tmp_path, num_classes=0)
    assert len(server.requests) == 1
    assert headless.module.num_classes == 0 and "head" not in headless.variables["params"]


def test_torchvision_table_goes_to_torch_home(server, files, tmp_path, monkeypatch):
    """A name and a weights tag: the table's file under the endpoint, into $TORCH_HOME."""
    pth = files["pth"]
    server.routes[f"/mirror/{pth.name}"] = (200, {}, pth.read_bytes())
    monkeypatch.setitem(module.TORCHVISION_FILES, "resnet18", {"IMAGENET1K_V1": pth.name})
    monkeypatch.setenv(module.TORCHVISION_URL_VARIABLE, f"{server.url}/mirror/")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    got = rj.weights.pretrained("resnet18")
    assert got.preprocessing == rj.weights.PREPROCESSING["torchvision"]
    assert_same(got, rj.weights.from_torchvision(pth))
    assert os.listdir(tmp_path / "torch" / "hub" / "checkpoints") == [pth.name]
    # torchvision reads the same cache: no download.
    model = torchvision.models.resnet18(num_classes=10)
    state = torch.hub.load_state_dict_from_url(f"{server.url}/mirror/{pth.name}", progress=False)
    model.load_state_dict(state)
    assert server.requests == [("GET", f"/mirror/{pth.name}")]


def test_torchvision_resnext_v2_weights_from_the_table(server, tmp_path, monkeypatch):
    """The ResNeXt/wide names are in the table: their V2 tag takes V2 preprocessing."""
    torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.save(torchvision.models.resnext50_32x4d().state_dict(), buffer)
    pth = buffer.getvalue()
    name = f"resnext50_32x4d-{hashlib.sha256(pth).hexdigest()[:10]}.pth"
    server.routes[f"/mirror/{name}"] = (200, {}, pth)
    table = dict(module.TORCHVISION_FILES["resnext50_32x4d"], IMAGENET1K_V2=name)
    monkeypatch.setitem(module.TORCHVISION_FILES, "resnext50_32x4d", table)
    monkeypatch.setenv(module.TORCHVISION_URL_VARIABLE, f"{server.url}/mirror/")
    got = rj.weights.pretrained(
        "resnext50_32x4d", weights="IMAGENET1K_V2", cache_dir=tmp_path, num_classes=0
    )
    assert got.preprocessing == rj.weights.PREPROCESSING["torchvision-v2"]
    assert (got.module.groups, got.module.base_width) == (32, 4)
    assert got.module.num_classes == 0 and server.requests == [("GET", f"/mirror/{name}")]
    with pytest.raises(rj.errors.UserError, match="publishes no 'IMAGENET1K_V2' weights"):
        rj.weights.pretrained("resnext101_64x4d", weights="IMAGENET1K_V2", cache_dir=tmp_path)


def test_torchvision_checksum_mismatch_saves_nothing(server, files, tmp_path):
    # torchvision's real file name, our random weights: their sha256 does not start f37072fd.
    server.routes[f"/models/{PUBLISHED_R18}"] = (200, {}, files["pth"].read_bytes())
    message = one_line_error(
        rj.weights.pretrained, "resnet18", endpoint=f"{server.url}/models", cache_dir=tmp_path
    )
    assert re.search(r"checksum mismatch .*expected \"f37072fd\", got \"[0-9a-f]{64}\"", message)
    assert str(tmp_path / PUBLISHED_R18) in message
    assert os.listdir(tmp_path) == []  # neither the file nor torch.hub's .partial


def test_torchvision_corrupt_cached_file_is_named(server, files, tmp_path):
    pth = files["pth"]
    (tmp_path / pth.name).write_bytes(pth.read_bytes()[:1000])  # an interrupted copy
    url = f"{server.url}/models/{pth.name}"
    message = one_line_error(rj.weights.pretrained, "resnet18", weights=url, cache_dir=tmp_path)
    assert f"{tmp_path / pth.name} (torch.hub's cache) cannot be read" in message
    assert "delete it and call again" in message and server.requests == []


def test_torchvision_offline_fails_fast_naming_the_file_and_where_to_put_it(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    message = one_line_error(
        rj.weights.pretrained,
        "resnet50",
        weights="IMAGENET1K_V2",
        endpoint=f"http://127.0.0.1:{port}",
        cache_dir=tmp_path,
    )
    assert time.monotonic() - start < 2.0
    assert "cannot connect" in message
    assert f"could not download http://127.0.0.1:{port}/resnet50-11ad3fa6.pth" in message
    assert f"save it as {tmp_path / 'resnet50-11ad3fa6.pth'}." in message
    assert os.listdir(tmp_path) == []


def test_a_cache_that_cannot_be_written_is_named_as_the_problem(server, files, tmp_path):
    """A write that fails (here: past RLIMIT_FSIZE) is not a failed download."""
    pth = files["pth"]
    server.routes[f"/models/{pth.name}"] = (200, {}, pth.read_bytes())
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(UserError) as e:
            rj.weights.pretrained(
                "resnet18", weights=f"{server.url}/models/{pth.name}", cache_dir=tmp_path
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(e.value)
    assert "\n" not in message and "could not download" not in message
    assert "cannot write to the cache" in message and "File too large" in message
    assert str(tmp_path / pth.name) in message
    assert os.listdir(tmp_path) == [] and len(server.requests) == 1


# --------------------------------------------------------------------------- #
# The hub sources: huggingface_hub.
# --------------------------------------------------------------------------- #


def test_huggingface_download_convert_then_cache(hub, files, tmp_path, monkeypatch):
    """Into $HF_HUB_CACHE, huggingface_hub's layout; a cached call asks only for the commit."""
    commit = hub.add("microsoft/resnet-18", files["hf"])
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    got = rj.weights.pretrained("resnet18", source="huggingface", endpoint=hub.url)
    reference = rj.weights.from_transformers(files["hf"])
    assert_same(got, reference)
    # preprocessor_config.json was fetched and used (not the default recipe).
    assert got.preprocessing.resize == 248 and got.preprocessing.interpolation == "bilinear"
    base = "/microsoft/resnet-18/resolve"
    sha = hashlib.sha256((files["hf"] / "model.safetensors").read_bytes()).hexdigest()
    assert hub.requests == [
        ("HEAD", f"{base}/main/config.json"),
        ("GET", f"{base}/main/config.json"),
        # The other files by the commit the first answer named.
        ("HEAD", f"{base}/{commit}/preprocessor_config.json"),
        ("GET", f"{base}/{commit}/preprocessor_config.json"),
        ("HEAD", f"{base}/{commit}/model.safetensors"),  # the redirect to storage
    ]
    assert hub.storage.requests == [("GET", f"/blobs/{sha}")]
    assert sorted(os.listdir(snapshot(cache, "microsoft/resnet-18", commit))) == sorted(
        os.listdir(files["hf"])
    )
    refs = cache / "models--microsoft--resnet-18" / "refs" / "main"
    assert refs.read_text() == commit
    # Cached: one HEAD (is main still that commit?), no download.
    n = len(hub.requests)
    assert_same(rj.weights.pretrained("resnet18", source="huggingface", endpoint=hub.url), got)
    assert hub.requests[n:] == [("HEAD", f"{base}/main/config.json")]
    # By the commit: no request at all.
    again = rj.weights.pretrained("resnet18", "huggingface", revision=commit, endpoint=hub.url)
    assert_same(again, got)
    assert len(hub.requests) == n + 1 and len(hub.storage.requests) == 1


def test_hub_files_all_come_from_the_commit_of_the_first_answer(hub, files, tmp_path):
    """main moves on in the middle of a call: the weights still come from the commit of the
    config.json fetched first, never a config of one commit with the weights of another."""
    b_dir = tmp_path / "b"
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic"
    )
    config.num_labels = 5
    transformers.ResNetForImageClassification(config).save_pretrained(b_dir)
    a = hub.add("owner/tiny", files["hf"])

    def move_main(method, path):
        if path.endswith("/main/config.json") and method == "GET":
            hub.add("owner/tiny", b_dir)  # main -> b

    hub.on_answer = move_main
    get = dict(source="huggingface", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert_same(
        rj.weights.pretrained("owner/tiny", **get), rj.weights.from_transformers(files["hf"])
    )
    assert all(f"/resolve/{a}/" in p for _, p in hub.requests[2:])
    hub.on_answer = None
    # The next call follows main to b: all of b's files, none of a's kept ones.
    got = rj.weights.pretrained("owner/tiny", **get)
    assert got.module.num_classes == 5
    assert_same(got, rj.weights.from_transformers(b_dir))
    # a is still cached, by its commit: no request.
    n = len(hub.requests)
    assert rj.weights.pretrained("owner/tiny", revision=a, **get).module.num_classes == 3
    assert len(hub.requests) == n


def test_huggingface_repo_without_preprocessor_or_with_only_a_pickle(hub, files, tmp_path):
    # No preprocessor_config.json: the hub answers 404 (EntryNotFound).
    slim = {n: (files["hf"] / n).read_bytes() for n in ("config.json", "model.safetensors")}
    commit = hub.add("owner/tiny", slim, refs=("v2",))
    get = dict(source="huggingface", revision="v2", endpoint=hub.url, cache_dir=tmp_path)
    got = rj.weights.pretrained("owner/tiny", **get)
    assert got.preprocessing == rj.weights.PREPROCESSING["huggingface"]
    assert ("HEAD", f"/owner/tiny/resolve/{commit}/preprocessor_config.json") in hub.requests
    assert sorted(os.listdir(snapshot(tmp_path, "owner/tiny", commit))) == sorted(slim)
    # The cache records the 404 (.no_exist): not asked again.
    n = len(hub.requests)
    assert_same(rj.weights.pretrained("owner/tiny", **get), got)
    assert hub.requests[n:] == [("HEAD", "/owner/tiny/resolve/v2/config.json")]
    # A repo with pytorch_model.bin only (torch is installed): read after the safetensors' 404.
    state = safetensors_torch.load_file(files["hf"] / "model.safetensors")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    pickled = {"config.json": slim["config.json"], "pytorch_model.bin": buffer.getvalue()}
    commit = hub.add("owner/pickled", pickled)
    got = rj.weights.pretrained(
        "owner/pickled", "huggingface", endpoint=hub.url, cache_dir=tmp_path
    )
    assert_same(got, rj.weights.from_transformers(files["hf"] / "model.safetensors"))
    assert ("HEAD", f"/owner/pickled/resolve/{commit}/model.safetensors") in hub.requests


def test_timm_download_convert(hub, files, tmp_path):
    commit = hub.add("timm/resnet18.tv_in1k", files["timm"])
    got = rj.weights.pretrained(
        "resnet18.tv_in1k", source="timm", endpoint=hub.url, cache_dir=tmp_path
    )
    reference = rj.weights.from_torchvision(files["timm"] / "model.safetensors")
    # The timm config's preprocessing: resize floor(224 / 0.95), bicubic.
    assert (got.preprocessing.resize, got.preprocessing.interpolation) == (235, "bicubic")
    assert got.module == reference.module and got.module.num_classes == 10
    assert digest(got.variables) == digest(reference.variables)
    assert sorted(os.listdir(snapshot(tmp_path, "timm/resnet18.tv_in1k", commit))) == [
        "config.json",
        "model.safetensors",
    ]
    # "timm/<tag>" is the same; an explicit preprocessing= needs no config.json.
    n = len(hub.requests)
    mine = rj.weights.pretrained(
        "timm/resnet18.tv_in1k",
        source="timm",
        revision=commit,
        endpoint=hub.url,
        cache_dir=tmp_path,
        preprocessing="torchvision",
    )
    assert mine.preprocessing == rj.weights.PREPROCESSING["torchvision"] and len(hub.requests) == n


def test_timm_tags_of_the_later_resnets(hub, tmp_path):
    """A pre-activation timm repo converts through from_timm; a tag whose
    architecture resnet_jax names is checked against it (one line naming the tensor)."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    sd = ResNetV2(
        layers=[1, 1, 1, 1], conv_layer=create_conv2d, norm_layer=BatchNormAct2d
    ).state_dict()
    repo = tmp_path / "repo"
    repo.mkdir()
    safetensors_torch.save_file(sd, repo / "model.safetensors")
    cfg = {"input_size": [3, 224, 224], "crop_pct": 0.95, "interpolation": "bicubic"}
    (repo / "config.json").write_text(json.dumps({"architecture": "x", "pretrained_cfg": cfg}))
    hub.add("timm/resnetv2_tiny.test_in1k", repo)
    hub.add("timm/resnetv2_50.test_in1k", repo)
    got = rj.weights.pretrained(
        "resnetv2_tiny.test_in1k", source="timm", endpoint=hub.url, cache_dir=tmp_path / "c"
    )
    assert got.module.preact and got.module.stage_sizes == (1, 1, 1, 1)
    assert digest(got.variables) == digest(
        rj.weights.from_timm(repo / "model.safetensors").variables
    )
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.1\..* is missing"):
        rj.weights.pretrained(
            "resnetv2_50.test_in1k", source="timm", endpoint=hub.url, cache_dir=tmp_path / "c"
        )


def test_files_cached_by_huggingface_hub_are_used_offline_with_no_server(
    hub, files, tmp_path, monkeypatch
):
    """As transformers and timm leave them: hf_hub_download of the files each library
    fetches (timm: only model.safetensors, so the preprocessing comes from timm's own
    table), then HF_HUB_OFFLINE=1 and no server at all."""
    cache = tmp_path / "hub"
    hub.add("microsoft/resnet-18", files["hf"])
    hub.add("timm/resnet18.tv_in1k", files["timm"])
    for repo, names in [
        ("microsoft/resnet-18", ("config.json", "model.safetensors")),  # from_pretrained's
        ("timm/resnet18.tv_in1k", ("model.safetensors",)),  # timm.create_model's
    ]:
        for name in names:
            huggingface_hub.hf_hub_download(repo, name, cache_dir=cache, endpoint=hub.url)
    n = len(hub.requests)
    hub.stop()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match="preprocessor_config.json is not cached"):
        got = rj.weights.pretrained("resnet18", source="huggingface", cache_dir=cache)
    assert_same(got, rj.weights.from_transformers(files["hf"] / "model.safetensors"))
    got = rj.weights.pretrained("resnet18.tv_in1k", source="timm", cache_dir=cache)
    cfg = timm.models.get_pretrained_cfg("resnet18.tv_in1k").to_dict()
    assert got.preprocessing == rj.weights.Preprocessing.from_timm(cfg)
    reference = rj.weights.from_torchvision(files["timm"] / "model.safetensors")
    assert digest(got.variables) == digest(reference.variables)
    assert len(hub.requests) == n


def test_hub_offline_and_not_cached_is_one_line_naming_the_files(offline, tmp_path, monkeypatch):
    start = time.monotonic()
    message = one_line_error(
        rj.weights.pretrained, "resnet34", source="huggingface", revision="v1.0", cache_dir=tmp_path
    )
    assert time.monotonic() - start < 2.0
    assert (
        "config.json of microsoft/resnet-34 (revision 'v1.0') is not in the Hugging Face" in message
    )
    assert f"cache {tmp_path} and HF_HUB_OFFLINE is set" in message
    command = (
        "`hf download microsoft/resnet-34 config.json preprocessor_config.json model.safetensors "
        f"--revision v1.0 --cache-dir {tmp_path}`"
    )
    assert command in message
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "default"))
    message = one_line_error(rj.weights.pretrained, "resnet50.a1_in1k", source="timm")
    # timm installed: its table has the preprocessing; the weights are what is missing.
    assert "model.safetensors of timm/resnet50.a1_in1k (revision 'main')" in message
    assert f"cache {tmp_path / 'default'} and HF_HUB_OFFLINE is set" in message
    assert "`hf download timm/resnet50.a1_in1k config.json model.safetensors`" in message


def test_hub_refused_connection_is_one_line(tmp_path, monkeypatch):
    """huggingface_hub retries a refused connection, sleeping about 25 s in all when
    nothing is cached; the sleeps are skipped here."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    message = one_line_error(
        rj.weights.pretrained,
        "resnet18",
        source="huggingface",
        endpoint=endpoint,
        cache_dir=tmp_path,
    )
    assert "config.json of microsoft/resnet-18 (revision 'main') is not in the" in message
    assert "the hub cannot be reached" in message
    assert f"`HF_ENDPOINT={endpoint} hf download microsoft/resnet-18 " in message


def test_corrupt_and_truncated_hub_files(hub, files, tmp_path, monkeypatch):
    """Bytes that do not match the hub's checksum are refused, cached or just downloaded."""
    body = (files["timm"] / "model.safetensors").read_bytes()
    sha = hashlib.sha256(body).hexdigest()
    hub.add("timm/resnet18.tv_in1k", files["timm"])
    get = dict(source="timm", endpoint=hub.url, cache_dir=tmp_path)
    blob = tmp_path / "models--timm--resnet18.tv_in1k" / "blobs" / sha
    # A download cut short (fewer bytes than X-Linked-Size): huggingface_hub keeps nothing.
    hub.storage.routes[f"/blobs/{sha}"] = (200, {}, body[: len(body) // 2])
    message = one_line_error(rj.weights.pretrained, "resnet18.tv_in1k", **get)
    assert "the download of model.safetensors of timm/resnet18.tv_in1k was cut short" in message
    assert not blob.exists()
    # Other bytes of the right size: saved by huggingface_hub, refused here, naming the file.
    hub.storage.routes[f"/blobs/{sha}"] = (200, {}, bytes(len(body)))
    message = one_line_error(rj.weights.pretrained, "resnet18.tv_in1k", **get)
    assert (
        f"{blob} (model.safetensors of timm/resnet18.tv_in1k in the Hugging Face cache)" in message
    )
    assert f"its sha256 is {hashlib.sha256(bytes(len(body))).hexdigest()}, not {sha}" in message
    assert "Delete it and call again" in message
    # Deleted: downloaded anew.
    hub.storage.routes[f"/blobs/{sha}"] = (200, {}, body)
    blob.unlink()
    reference = rj.weights.from_torchvision(files["timm"] / "model.safetensors")
    assert rj.weights.pretrained("resnet18.tv_in1k", **get).module == reference.module
    # Corrupted in the cache later (and offline): refused without a request.
    config = next((tmp_path / "models--timm--resnet18.tv_in1k" / "blobs").glob("?" * 40))
    config.write_bytes(config.read_bytes().replace(b"bicubic", b"bilinea"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests)
    message = one_line_error(rj.weights.pretrained, "resnet18.tv_in1k", **get)
    assert f"{config} (config.json of timm/resnet18.tv_in1k" in message
    assert "its git blob sha1 is" in message and len(hub.requests) == n


def test_hub_errors_are_one_line(hub, files, tmp_path):
    get = dict(endpoint=hub.url, cache_dir=tmp_path)
    message = one_line_error(rj.weights.pretrained, "owner/none", "huggingface", **get)
    assert "no Hugging Face repo owner/none (or it is private or gated" in message
    assert "HF_TOKEN" in message
    hub.add("owner/tiny", files["hf"])
    message = one_line_error(
        rj.weights.pretrained, "owner/tiny", "huggingface", revision="v9", **get
    )
    assert "the Hugging Face repo owner/tiny has no revision 'v9'" in message
    hub.add("owner/weightless", {"README.md": b"nothing"})
    message = one_line_error(rj.weights.pretrained, "owner/weightless", "huggingface", **get)
    assert "owner/weightless has no config.json at revision 'main'" in message
    hub.add("owner/gated", files["hf"])
    hub.gated.add("owner/gated")
    message = one_line_error(rj.weights.pretrained, "owner/gated", "huggingface", **get)
    assert f"owner/gated is gated: accept its conditions at {hub.url}/owner/gated" in message
    hub.routes["/owner/tiny/resolve/main/config.json"] = (418, {}, b"")
    message = one_line_error(rj.weights.pretrained, "owner/tiny", "huggingface", **get)
    assert "not in the Hugging Face cache" in message and "hub answered HTTP 418" in message
    message = one_line_error(rj.weights.pretrained, "a/b/c", "huggingface", **get)
    assert "'a/b/c'" in message
    assert not list(tmp_path.glob("models--*/snapshots/*/*"))  # nothing saved


def test_unknown_names_sources_weights_and_options_are_refused_before_any_request(tmp_path):
    def refused(match, *args, **kwargs):
        message = one_line_error(rj.weights.pretrained, *args, cache_dir=tmp_path, **kwargs)
        assert re.search(match, message), message

    refused("valid names: resnet18, resnet34, resnet50, resnet101, resnet152", "resnet19")
    refused("valid: torchvision, huggingface, timm", "resnet18", source="keras")
    refused(
        "no 'IMAGENET1K_V2' weights for resnet18; valid: IMAGENET1K_V1",
        "resnet18",
        weights="IMAGENET1K_V2",
    )
    refused("valid: resnet18, .*resnet152 .*or a repo id", "resnet-50", source="huggingface")
    refused("not a timm pretrained tag", "resnet50", source="timm")
    refused("does not carry its checksum", "resnet18", weights="http://127.0.0.1:9/r18.pth")
    refused("does not carry its checksum", "resnet18", weights="http://127.0.0.1:9/r-12ab.pth")
    refused("Unknown model 'resnet19'", "resnet19", weights="http://127.0.0.1:9/r-0123abcd.pth")
    refused("revision= is for the hub sources", "resnet18", revision="v1")
    refused("weights= is for source='torchvision', not 'timm'", "a.b", source="timm", weights="x")
    refused(r"timeout= is gone: set HF_HUB_ETAG_TIMEOUT", "resnet18", "huggingface", timeout=5)
    refused(r"unknown option\(s\) \['colour'\]", "resnet18", colour=1)
    refused(r"unknown option\(s\) \['config'\]", "resnet18", config={})
    assert os.listdir(tmp_path) == []


_WITHOUT_TORCH = textwrap.dedent(
    """
    import hashlib, importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("No module named 'torch' (blocked by the test)")

    sys.meta_path.insert(0, NoTorch())
    import jax, numpy as np
    import resnet_jax as rj

    report = {"hub_at_import": "huggingface_hub" in sys.modules}
    for name, source in [("resnet18", "huggingface"), ("resnet18.tv_in1k", "timm")]:
        leaves = jax.tree.leaves(rj.weights.pretrained(name, source=source).variables)
        report[source] = hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in leaves)).hexdigest()
    for weights in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
        try:
            rj.weights.pretrained("resnet50", weights=weights)
        except rj.errors.UserError as e:
            report[weights] = str(e)
    report["torch_imported"] = "torch" in sys.modules
    print(json.dumps(report))
    """
)


def digest(variables):
    leaves = jax.tree.leaves(variables)
    return hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in leaves)).hexdigest()


def test_safetensors_sources_without_torch_through_the_environment(hub, files, tmp_path):
    """A fresh process with torch blocked, the hub and the caches set by HF_ENDPOINT,
    HF_HUB_CACHE and TORCH_HOME: the hub sources work; a .pth is refused, before any
    download, naming timm's safetensors copy of the same weights."""
    hub.add("microsoft/resnet-18", files["hf"])
    hub.add("timm/resnet18.tv_in1k", files["timm"])
    script = tmp_path / "without_torch.py"
    script.write_text(_WITHOUT_TORCH)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RESNET_JAX_TORCHVISION_URL"):
        env.pop(variable, None)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["torch_imported"] is False and report["hub_at_import"] is False
    for weights, tag in [("IMAGENET1K_V1", "tv_in1k"), ("IMAGENET1K_V2", "tv2_in1k")]:
        message = report[weights]
        assert "\n" not in message and "needs torch" in message
        assert f"timm/resnet50.{tag}" in message
        assert f"pretrained('resnet50.{tag}', source='timm')" in message
    assert report["huggingface"] == digest(rj.weights.from_transformers(files["hf"]).variables)
    timm_reference = rj.weights.from_torchvision(files["timm"] / "model.safetensors")
    assert report["timm"] == digest(timm_reference.variables)
    assert (tmp_path / "hub" / "models--microsoft--resnet-18" / "snapshots").is_dir()
    assert (tmp_path / "hub" / "models--timm--resnet18.tv_in1k" / "snapshots").is_dir()
    assert not (tmp_path / "torch").exists()  # refused before torch.hub's cache
