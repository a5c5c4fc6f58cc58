"""rj.weights.pretrained against a local HTTP server on 127.0.0.1 (no internet).

The server serves files the tests make (random weights): a torchvision
resnet18 ``.pth`` named by its sha256 as torch.hub names files, a
transformers ResNet repo laid out as the Hugging Face hub serves it (small
files with their git blob sha1 as ETag; the LFS weights behind a redirect
carrying ``X-Linked-Etag``), and a timm repo in torchvision's layout. It
counts requests, so a cached call can be seen to make none, and can fail a
path's next requests (an HTTP status, a connection closed without an answer,
or in the middle of one).
"""

import hashlib
import http.server
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax.errors import UserError

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

PUBLISHED_R18 = "resnet18-f37072fd.pth"  # torchvision's file name: not our random weights


def git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Server(http.server.ThreadingHTTPServer):
    """Serves ``routes[path] = (status, headers, body)``; 404 otherwise; logs paths."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes, self.requests, self.failures = {}, [], {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        """A client that hangs up (the tests' cut and reset answers) is expected: no trace."""

    def file(self, path, body, **headers):
        self.routes[path] = (200, headers, body)

    def hub_file(self, path, body, lfs=False, **headers):
        """As the hub serves a repo file: LFS files redirect to storage."""
        if not lfs:
            return self.file(path, body, ETag=f'"{git_sha1(body)}"', **headers)
        sha = hashlib.sha256(body).hexdigest()
        redirect = {"Location": f"/cdn/{sha}", "X-Linked-Etag": f'"{sha}"', **headers}
        self.routes[path] = (302, redirect, b"")
        self.file(f"/cdn/{sha}", body, ETag='"d41d8cd98f00b204e9800998ecf8427e"')

    def fail(self, path, *failures):
        """The next requests of ``path`` fail: an HTTP status, 'reset' or 'cut'."""
        self.failures[path] = list(failures)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"not found"))
        failure = (self.server.failures.get(self.path) or [None]).pop(0)
        if failure == "reset":  # closed without an answer
            self.close_connection = True
            return
        if failure == "cut":  # closed after half the body
            self.close_connection = True
            body = body[: len(body) // 2]
            headers = {**headers, "Content-Length": str(len(body) * 2)}
        elif failure is not None:
            status, headers, body = failure, {}, b""
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serving():
    s = Server()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()


server = pytest.fixture(serving, name="server")
# Another host (another origin: another port) for the hub's storage redirects.
cdn = pytest.fixture(serving, name="cdn")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The local files: torchvision .pth, an HF repo directory, a timm repo directory."""
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

    timm = root / "timm"
    timm.mkdir()
    safetensors_torch.save_file(sd, timm / "model.safetensors")
    cfg = {"input_size": [3, 224, 224], "crop_pct": 0.95, "interpolation": "bicubic"}
    timm_config = {"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": cfg}
    (timm / "config.json").write_text(json.dumps(timm_config))
    return {"root": root, "pth": root / name, "hf": hf, "timm": timm}


def serve_repo(server, repo, directory):
    for f in sorted(directory.iterdir()):
        server.hub_file(f"/{repo}/resolve/main/{f.name}", f.read_bytes(), f.suffix != ".json")


def serve_commit(server, repo, directory, commit, *refs):
    """A repo's files at ``commit``, as the hub serves them: by the commit and by ``refs``."""
    for at in (commit, *refs):
        for f in sorted(directory.iterdir()):
            path = f"/{repo}/resolve/{at}/{f.name}"
            lfs = f.suffix != ".json"
            server.hub_file(path, f.read_bytes(), lfs, **{"X-Repo-Commit": commit})


def assert_same(a, b):
    (ma, va), (mb, vb) = a, b
    assert ma == mb and a.preprocessing == b.preprocessing
    flat_a, flat_b = jax.tree.leaves_with_path(va), jax.tree.leaves_with_path(vb)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(flat_a, flat_b))


def test_torchvision_download_convert_then_cache(server, files, tmp_path):
    pth = files["pth"]
    server.file(f"/models/{pth.name}", pth.read_bytes())
    url = f"{server.url}/models/{pth.name}"
    got = rj.weights.pretrained("resnet18", source="torchvision", weights=url, cache_dir=tmp_path)
    assert_same(got, rj.weights.from_torchvision(pth, name="resnet18"))
    assert got.module.num_classes == 10 and server.requests == [f"/models/{pth.name}"]
    cached = tmp_path / "torchvision" / pth.name
    assert cached.read_bytes() == pth.read_bytes()
    assert sorted(os.listdir(tmp_path / "torchvision")) == [pth.name]  # no temporary files
    # Cached: no request; options reach the converter.
    headless = rj.weights.pretrained("resnet18", weights=url, cache_dir=tmp_path, num_classes=0)
    assert len(server.requests) == 1
    assert headless.module.num_classes == 0 and "head" not in headless.variables["params"]


def test_huggingface_download_convert_then_cache(server, files, tmp_path, monkeypatch):
    serve_repo(server, "microsoft/resnet-18", files["hf"])
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path))
    got = rj.weights.pretrained("resnet18", source="huggingface")
    reference = rj.weights.from_transformers(files["hf"])
    assert_same(got, reference)
    # preprocessor_config.json was fetched and used (not the default recipe).
    assert got.preprocessing.resize == 248 and got.preprocessing.interpolation == "bilinear"
    sha = hashlib.sha256((files["hf"] / "model.safetensors").read_bytes()).hexdigest()
    base = "/microsoft/resnet-18/resolve/main/"
    assert server.requests == [
        *(base + n for n in ("config.json", "preprocessor_config.json", "model.safetensors")),
        f"/cdn/{sha}",  # the redirect to storage, as the hub's LFS files
    ]
    directory = tmp_path / "huggingface" / "microsoft" / "resnet-18" / "main"
    assert sorted(os.listdir(directory)) == sorted(os.listdir(files["hf"]))
    again = rj.weights.pretrained("resnet18", source="huggingface")
    assert len(server.requests) == 4
    assert_same(again, reference)


def test_huggingface_repo_without_preprocessor_or_with_a_lost_config(server, files, tmp_path):
    for name in ("config.json", "model.safetensors"):  # no preprocessor_config.json: a 404
        body = (files["hf"] / name).read_bytes()
        server.hub_file(f"/owner/tiny/resolve/v2/{name}", body, lfs=name != "config.json")
    get = dict(source="huggingface", revision="v2", endpoint=server.url, cache_dir=tmp_path)
    got = rj.weights.pretrained("owner/tiny", **get)
    assert got.preprocessing == rj.weights.PREPROCESSING["huggingface"]
    assert "/owner/tiny/resolve/v2/preprocessor_config.json" in server.requests
    directory = tmp_path / "huggingface" / "owner" / "tiny" / "v2"
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    (directory / "config.json").unlink()
    n = len(server.requests)
    assert_same(rj.weights.pretrained("owner/tiny", **get), got)
    assert server.requests[n:] == ["/owner/tiny/resolve/v2/config.json"]  # only what is missing


def test_wrong_bytes_leave_nothing_under_the_final_name(server, files, tmp_path, monkeypatch):
    # torchvision's real file name, our random weights: their sha256 does not start f37072fd.
    server.file(f"/mirror/{PUBLISHED_R18}", files["pth"].read_bytes())
    monkeypatch.setenv("RESNET_JAX_TORCHVISION_URL", f"{server.url}/mirror/")
    with pytest.raises(
        UserError, match=r"checksum mismatch \(sha256 [0-9a-f]{64}, expected f37072fd"
    ):
        rj.weights.pretrained("resnet18", source="torchvision", cache_dir=tmp_path)
    assert os.listdir(tmp_path / "torchvision") == []  # neither the file nor a temporary one
    # A hub file whose bytes differ from the X-Linked-Etag sent with it.
    serve_repo(server, "timm/resnet18.tv_in1k", files["timm"])
    sha = hashlib.sha256((files["timm"] / "model.safetensors").read_bytes()).hexdigest()
    server.file(f"/cdn/{sha}", b"truncated")
    with pytest.raises(UserError, match=rf"checksum mismatch \(sha256 .*expected {sha}\)"):
        rj.weights.pretrained(
            "resnet18.tv_in1k", source="timm", endpoint=server.url, cache_dir=tmp_path
        )
    directory = tmp_path / "huggingface" / "timm" / "resnet18.tv_in1k" / "main"
    assert os.listdir(directory) == ["config.json"]  # verified by its git sha1; kept
    # No checksum sent: refused, not trusted.
    server.routes["/timm/resnet18.tv_in1k/resolve/main/model.safetensors"] = (200, {}, b"x")
    with pytest.raises(UserError, match="sent no checksum"):
        rj.weights.pretrained(
            "resnet18.tv_in1k", source="timm", endpoint=server.url, cache_dir=tmp_path
        )
    assert os.listdir(directory) == ["config.json"]
    with pytest.raises(UserError, match=r"HTTP 404 .*save it as .*resnet-50.main.config\.json"):
        rj.weights.pretrained(
            "resnet50", source="huggingface", endpoint=server.url, cache_dir=tmp_path
        )


def test_checksum_comes_from_the_answer_before_a_redirect_to_another_host(
    server, cdn, files, tmp_path
):
    """As huggingface_hub reads it: same-host redirects (a renamed repo) are followed;
    at the first redirect to another host (storage, a CDN with its own md5 ETag) that
    redirect's X-Linked-Etag, else its ETag, is the file's checksum."""
    config = (files["hf"] / "config.json").read_bytes()
    server.routes["/old/tiny/resolve/main/config.json"] = (
        307,
        {"Location": "/owner/tiny/resolve/main/config.json"},
        b"",
    )
    server.hub_file("/owner/tiny/resolve/main/config.json", config)
    processor = (files["hf"] / "preprocessor_config.json").read_bytes()
    server.hub_file("/old/tiny/resolve/main/preprocessor_config.json", processor)
    weights = (files["hf"] / "model.safetensors").read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    for at, body in (("main", weights), ("v2", b"corrupt")):
        location = {"Location": f"{cdn.url}/blob/{at}", "ETag": f'"{sha}"'}  # no X-Linked-Etag
        server.routes[f"/old/tiny/resolve/{at}/model.safetensors"] = (302, location, b"")
        cdn.file(f"/blob/{at}", body, ETag='"d41d8cd98f00b204e9800998ecf8427e"')
    get = dict(source="huggingface", endpoint=server.url, cache_dir=tmp_path)
    got = rj.weights.pretrained("old/tiny", **get)
    assert_same(got, rj.weights.from_transformers(files["hf"]))
    assert cdn.requests == ["/blob/main"]
    server.routes["/old/tiny/resolve/v2/config.json"] = (
        200,
        {"ETag": f'"{git_sha1(config)}"'},
        config,
    )
    with pytest.raises(
        UserError, match=rf"checksum mismatch \(sha256 [0-9a-f]{{64}}, expected {sha}\)"
    ):
        rj.weights.pretrained("old/tiny", revision="v2", **get)


def test_hub_files_all_come_from_the_commit_of_the_first_answer(server, files, tmp_path):
    """A branch that moves between two calls cannot pair one commit's config with
    another's weights: the first answer's X-Repo-Commit pins every other file."""
    a_dir, b_dir = files["hf"], tmp_path / "b"
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic"
    )
    config.num_labels = 5
    transformers.ResNetForImageClassification(config).save_pretrained(b_dir)
    a, b = hashlib.sha1(b"a").hexdigest(), hashlib.sha1(b"b").hexdigest()
    sha_a = hashlib.sha256((a_dir / "model.safetensors").read_bytes()).hexdigest()
    root = tmp_path / "cache" / "huggingface" / "owner" / "tiny"
    get = dict(source="huggingface", endpoint=server.url, cache_dir=tmp_path / "cache")

    serve_commit(server, "owner/tiny", a_dir, a, "main")
    server.file(f"/cdn/{sha_a}", b"interrupted")  # the json files saved, the weights not
    with pytest.raises(UserError, match="checksum mismatch"):
        rj.weights.pretrained("owner/tiny", **get)
    serve_commit(server, "owner/tiny", a_dir, a)  # storage mended,
    serve_commit(server, "owner/tiny", b_dir, b, "main")  # and main moved on
    n = len(server.requests)
    got = rj.weights.pretrained("owner/tiny", **get)
    assert server.requests[n:] == [f"/owner/tiny/resolve/{a}/model.safetensors", f"/cdn/{sha_a}"]
    reference = rj.weights.from_transformers(a_dir)
    assert_same(got, reference)
    assert sorted(os.listdir(root)) == sorted([a, "refs"])
    assert (root / "refs" / "main").read_text() == a
    # A complete set is used without the network, by the branch or by the commit.
    for revision in ("main", a):
        assert_same(rj.weights.pretrained("owner/tiny", revision=revision, **get), reference)
    assert len(server.requests) == n + 2
    # A fresh cache: the branch's first answer names b; the rest comes from b.
    get["cache_dir"] = tmp_path / "fresh"
    assert_same(rj.weights.pretrained("owner/tiny", **get), rj.weights.from_transformers(b_dir))
    sha_b = hashlib.sha256((b_dir / "model.safetensors").read_bytes()).hexdigest()
    assert server.requests[n + 2 :] == [
        "/owner/tiny/resolve/main/config.json",
        *(
            f"/owner/tiny/resolve/{b}/{f}"
            for f in ("preprocessor_config.json", "model.safetensors")
        ),
        f"/cdn/{sha_b}",
    ]


def test_cached_files_are_readable_as_the_umask_allows(server, files, tmp_path):
    """Not mkstemp's 0600: a shared cache's files are 0666 less the umask, as
    huggingface_hub's."""
    pth = files["pth"]
    server.file(f"/models/{pth.name}", pth.read_bytes())
    serve_commit(server, "owner/tiny", files["hf"], hashlib.sha1(b"a").hexdigest(), "main")
    for umask in (0o022, 0o002):
        cache = tmp_path / oct(umask)
        old = os.umask(umask)
        try:
            rj.weights.pretrained(
                "resnet18", weights=f"{server.url}/models/{pth.name}", cache_dir=cache
            )
            rj.weights.pretrained(
                "owner/tiny", source="huggingface", endpoint=server.url, cache_dir=cache
            )
        finally:
            os.umask(old)
        saved = [os.path.join(d, f) for d, _, names in os.walk(cache) for f in names]
        assert {oct(os.stat(f).st_mode & 0o777) for f in saved} == {oct(0o666 & ~umask)}
        assert len(saved) == 5  # the .pth, the repo's three files, refs/main


def test_a_cache_that_cannot_be_written_is_named_as_the_problem(server, files, tmp_path):
    """A write that fails (here: past RLIMIT_FSIZE, as a full disk) is not a failed download."""
    pth = files["pth"]
    server.file(f"/models/{pth.name}", pth.read_bytes())
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
    assert str(tmp_path / "torchvision" / pth.name) in message
    assert os.listdir(tmp_path / "torchvision") == [] and len(server.requests) == 1


def test_retries_on_429_5xx_and_dropped_connections(server, files, tmp_path, monkeypatch):
    pth = files["pth"]
    path = f"/models/{pth.name}"
    server.file(path, pth.read_bytes())
    url = f"{server.url}{path}"
    server.fail(path, "reset", 503)
    start = time.monotonic()
    got = rj.weights.pretrained("resnet18", weights=url, cache_dir=tmp_path / "a")
    assert time.monotonic() - start >= 3.0  # backed off 1 s, then 2 s
    assert server.requests == [path] * 3
    assert_same(got, rj.weights.from_torchvision(pth, name="resnet18"))
    monkeypatch.setattr("resnet_jax.hub._RETRY_DELAYS", (0.01, 0.01))
    server.fail(path, "cut", 429, 502)  # three tries, three failures
    with pytest.raises(UserError, match=r"could not download .*: HTTP 502 .*\(3 tries\)"):
        rj.weights.pretrained("resnet18", weights=url, cache_dir=tmp_path / "b")
    assert server.requests == [path] * 6 and os.listdir(tmp_path / "b" / "torchvision") == []
    server.fail(path, 404)  # not retried
    with pytest.raises(UserError, match=r"HTTP 404 Not Found\. Nothing"):
        rj.weights.pretrained("resnet18", weights=url, cache_dir=tmp_path / "b")
    assert server.requests == [path] * 7


def test_temporary_files_of_killed_downloads_are_removed(server, files, tmp_path):
    """On the next download to the folder, a .part untouched for a day goes; a live
    download's (recent) stays, as does anything else."""
    pth = files["pth"]
    server.file(f"/models/{pth.name}", pth.read_bytes())
    folder = tmp_path / "torchvision"
    folder.mkdir()
    stale, live, other = f".{pth.name}.0a1b2c.part", ".resnet34.pth.3d4e5f.part", "notes.part"
    for name in (stale, live, other):
        (folder / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    for name in (stale, other):
        os.utime(folder / name, (two_days_ago, two_days_ago))
    rj.weights.pretrained("resnet18", weights=f"{server.url}/models/{pth.name}", cache_dir=tmp_path)
    assert sorted(os.listdir(folder)) == sorted([pth.name, live, other])


def test_offline_fails_fast_naming_the_file_and_where_to_put_it(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        rj.weights.pretrained(
            "resnet50",
            weights="IMAGENET1K_V2",
            endpoint=f"http://127.0.0.1:{port}",
            cache_dir=tmp_path,
        )
    assert time.monotonic() - start < 2.0
    message = str(e.value)
    assert "\n" not in message and "cannot connect" in message
    assert f"http://127.0.0.1:{port}/resnet50-11ad3fa6.pth" in message
    assert f"save it as {tmp_path / 'torchvision' / 'resnet50-11ad3fa6.pth'}." in message
    assert os.listdir(tmp_path / "torchvision") == []
    with pytest.raises(
        UserError, match=r"resolve/v1.0/config\.json: cannot connect.*all go in that folder"
    ):
        rj.weights.pretrained(
            "resnet34",
            source="huggingface",
            revision="v1.0",
            endpoint=f"http://127.0.0.1:{port}",
            cache_dir=tmp_path,
        )


def test_a_file_saved_by_hand_is_used_offline(files, tmp_path, monkeypatch):
    """The default cache: $RESNET_JAX_CACHE, else $XDG_CACHE_HOME/resnet_jax."""
    monkeypatch.delenv("RESNET_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "resnet_jax" / "torchvision").mkdir(parents=True)
    (tmp_path / "xdg" / "resnet_jax" / "torchvision" / PUBLISHED_R18).write_bytes(
        files["pth"].read_bytes()
    )
    offline = "http://127.0.0.1:9"  # nothing listens: any request would fail
    got = rj.weights.pretrained("resnet18", endpoint=offline)
    assert_same(got, rj.weights.from_torchvision(files["pth"]))
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="save it as .*elsewhere.torchvision.resnet18-f37072fd"):
        rj.weights.pretrained("resnet18", endpoint=offline)


def test_unknown_names_list_the_choices(tmp_path):
    with pytest.raises(
        UserError, match="valid names: resnet18, resnet34, resnet50, resnet101, resnet152"
    ):
        rj.weights.pretrained("resnet19", cache_dir=tmp_path)
    with pytest.raises(UserError, match="valid: torchvision, huggingface, timm"):
        rj.weights.pretrained("resnet18", source="keras", cache_dir=tmp_path)
    with pytest.raises(
        UserError, match="no 'IMAGENET1K_V2' weights for resnet18; valid: IMAGENET1K_V1"
    ):
        rj.weights.pretrained("resnet18", weights="IMAGENET1K_V2", cache_dir=tmp_path)
    with pytest.raises(UserError, match="valid: resnet18, .*resnet152 .*or a repo id"):
        rj.weights.pretrained("resnet-50", source="huggingface", cache_dir=tmp_path)
    with pytest.raises(UserError, match="not a timm pretrained tag"):
        rj.weights.pretrained("resnet50", source="timm", cache_dir=tmp_path)
    with pytest.raises(UserError, match="does not carry its checksum"):
        rj.weights.pretrained("resnet18", weights="http://127.0.0.1:9/r18.pth", cache_dir=tmp_path)
    with pytest.raises(UserError, match="Unknown model 'resnet19'"):
        rj.weights.pretrained("resnet19", weights="http://127.0.0.1:9/r-0123abcd.pth")
    with pytest.raises(UserError, match="revision= is for the hub sources"):
        rj.weights.pretrained("resnet18", revision="v1", cache_dir=tmp_path)
    assert not os.path.exists(tmp_path / "torchvision")


_WITHOUT_TORCH = textwrap.dedent(
    """
    import hashlib, importlib.abc, json, sys
    import jax, numpy as np

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("No module named 'torch' (blocked by the test)")

    sys.meta_path.insert(0, NoTorch())
    import resnet_jax as rj

    endpoint, cache = sys.argv[1:]
    digests = {}
    for name, source in [("resnet18", "huggingface"), ("resnet18.tv_in1k", "timm")]:
        _, variables = rj.weights.pretrained(name, source=source, endpoint=endpoint, cache_dir=cache)
        leaves = jax.tree.leaves(variables)
        digests[source] = hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in leaves)).hexdigest()
    try:
        rj.weights.pretrained("resnet18", endpoint=endpoint, cache_dir=cache)
        message = None
    except ImportError as e:
        message = str(e)
    report = {"torch_imported": "torch" in sys.modules, "pth_error": message, **digests}
    print(json.dumps(report))
    """
)


def digest(variables):
    leaves = jax.tree.leaves(variables)
    return hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in leaves)).hexdigest()


def test_safetensors_sources_without_torch(server, files, tmp_path):
    serve_repo(server, "microsoft/resnet-18", files["hf"])
    serve_repo(server, "timm/resnet18.tv_in1k", files["timm"])
    script = tmp_path / "without_torch.py"
    script.write_text(_WITHOUT_TORCH)
    run = subprocess.run(
        [sys.executable, str(script), server.url, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["torch_imported"] is False
    assert "needs torch" in report["pth_error"]
    assert "pretrained('resnet18.tv_in1k', source='timm')" in report["pth_error"]
    assert not any(p.endswith(".pth") for p in server.requests)  # refused before downloading
    assert report["huggingface"] == digest(rj.weights.from_transformers(files["hf"]).variables)
    timm = rj.weights.from_torchvision(files["timm"] / "model.safetensors")
    assert report["timm"] == digest(timm.variables)
    # The timm config's preprocessing: resize floor(224 / 0.95), bicubic.
    got = rj.weights.pretrained("resnet18.tv_in1k", source="timm", cache_dir=tmp_path / "cache")
    assert (got.preprocessing.resize, got.preprocessing.interpolation) == (235, "bicubic")
    assert got.module == timm.module and digest(got.variables) == digest(timm.variables)
