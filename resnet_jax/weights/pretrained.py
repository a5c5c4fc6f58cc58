"""Downloads published ResNet weights into a local cache, checked, then converts them.

:func:`pretrained` (re-exported as ``rj.weights.pretrained``) is the one
function of resnet_jax that touches the network; the converters of
:mod:`resnet_jax.weights` never do. HTTP is the standard library's
``urllib``, so ``import resnet_jax`` still needs only jax and flax.

A file is written to a temporary file beside its final name and renamed
only after its checksum passed: a failed, corrupt or interrupted download
never leaves a file under the final name, and a file under the final name
is used as it is, without touching the network. That is also the offline
route: save the file yourself at the path the error message names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import secrets
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from resnet_jax.errors import UserError, one_line
from resnet_jax.models import model_spec

# A cycle: weights re-exports pretrained; its names are looked up at call time only.
from resnet_jax.weights.hf_layout import from_transformers
from resnet_jax.weights.preprocessing import Converted, Preprocessing
from resnet_jax.weights.torch_layout import from_torchvision

SOURCES = ("torchvision", "huggingface", "timm")
DEFAULT_ENDPOINTS = {
    "torchvision": "https://download.pytorch.org/models",
    "huggingface": "https://huggingface.co",
}
# The environment variables that override them (HF_ENDPOINT is huggingface_hub's).
ENDPOINT_VARIABLES = {"torchvision": "RESNET_JAX_TORCHVISION_URL", "huggingface": "HF_ENDPOINT"}

# torchvision.models.ResNet*_Weights' URLs (torchvision 0.29), under DEFAULT_ENDPOINTS.
TORCHVISION_FILES: dict[str, dict[str, str]] = {
    "resnet18": {"IMAGENET1K_V1": "resnet18-f37072fd.pth"},
    "resnet34": {"IMAGENET1K_V1": "resnet34-b627a593.pth"},
    "resnet50": {
        "IMAGENET1K_V1": "resnet50-0676ba61.pth",
        "IMAGENET1K_V2": "resnet50-11ad3fa6.pth",
    },
    "resnet101": {
        "IMAGENET1K_V1": "resnet101-63fe2227.pth",
        "IMAGENET1K_V2": "resnet101-cd907fc2.pth",
    },
    "resnet152": {
        "IMAGENET1K_V1": "resnet152-394f9c45.pth",
        "IMAGENET1K_V2": "resnet152-f82ba261.pth",
    },
}
_TORCHVISION_PREPROCESSING = {"IMAGENET1K_V1": "torchvision", "IMAGENET1K_V2": "torchvision-v2"}
HUGGINGFACE_REPOS = {name: f"microsoft/resnet-{name[6:]}" for name in TORCHVISION_FILES}
# A hub repo's files: the weights, first found of _WEIGHT_FILES, come last, so
# that their presence in the cache means the directory is complete.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CHUNK = 1 << 20


def default_cache_dir() -> str:
    """``$RESNET_JAX_CACHE``, else ``$XDG_CACHE_HOME/resnet_jax``, else ``~/.cache/resnet_jax``."""
    if os.environ.get("RESNET_JAX_CACHE"):
        return os.path.expanduser(os.environ["RESNET_JAX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "resnet_jax")


def pretrained(
    name: str,
    source: str = "torchvision",
    *,
    weights: str | None = None,
    revision: str = "main",
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> Converted:
    """Downloads published weights (once, into a cache, checksum verified) and converts them.

    >>> model, variables = rj.weights.pretrained("resnet50", source="torchvision")

    Sources, and how each file is verified:

    * ``'torchvision'``: ``name`` in resnet18/34/50/101/152; the ``.pth`` of
      ``torchvision.models.ResNet*_Weights`` (needs torch to read). As
      torch.hub does, the hex digits after the last '-' of the file name must
      start the file's sha256. Converted by ``from_torchvision``.
    * ``'huggingface'``: ``name`` in resnet18 ... resnet152 (the repos
      ``microsoft/resnet-18`` ... ``-152``) or any repo id ``'owner/name'`` of
      a transformers ResNet; ``config.json``, ``preprocessor_config.json``
      (if the repo has one) and ``model.safetensors`` (else
      ``pytorch_model.bin``, which needs torch). Converted by
      ``from_transformers``.
    * ``'timm'``: ``name`` is a timm pretrained tag of a plain ResNet, e.g.
      ``'resnet50.a1_in1k'``, or ``'resnet50.tv_in1k'`` / ``'tv2_in1k'``
      (torchvision's V1/V2 weights): the hub repo ``timm/<name>``, whose
      ``model.safetensors`` is in torchvision's layout and needs no torch.
      Converted by ``from_torchvision`` with
      ``Preprocessing.from_timm(config['pretrained_cfg'])``.

    Hub files are verified against the checksum the hub sends with them, as
    huggingface_hub reads it from the last answer before the first redirect
    to another host (the storage): ``X-Linked-Etag`` (the sha256 of an LFS
    file), else ``ETag`` (the sha256, or for a small file kept in git its git
    blob sha1). A pinned table would have to follow every revision of every
    repo; the hub's own hashes catch corrupt and truncated downloads for any
    revision. All files of a repo come from one commit: the one the first
    answer names (``X-Repo-Commit``); the others are fetched by it. A cached
    branch name is not re-checked: pass ``revision=`` a commit hash to choose.

    Files go to ``<cache_dir>/torchvision/<file name>`` and
    ``<cache_dir>/huggingface/<repo id>/<commit>/<file name>``, with
    ``<repo id>/refs/<revision>`` holding the commit of a branch or tag, as
    huggingface_hub's cache. A file already there is used without touching
    the network, as is a complete set saved in ``<repo id>/<revision>/``, so
    offline, save the file the error names at the path it names. Files are
    readable as the umask allows (``0o666 & ~umask``). An HTTP 429 or 5xx or
    a dropped connection is tried three times (after 1 s, then 2 s); a
    refused connection (offline) fails at once. Temporary files left by a
    download killed over a day ago are removed by the next one to the folder.

    Args:
      name: the model, as above.
      source: 'torchvision', 'huggingface' or 'timm'.
      weights: torchvision only: 'IMAGENET1K_V1' (the default, every
        depth), 'IMAGENET1K_V2' (50, 101, 152; preprocessing
        'torchvision-v2'), or the URL (used as is) of a torchvision-layout
        file named as torch.hub names files, ``<stem>-<8+ hex digits of its
        sha256>.pth``; then ``name`` is any model name (e.g. 'resnet20' for
        a CIFAR checkpoint) that the converter checks the weights against.
      revision: hub sources: a branch, tag or commit hash.
      endpoint: the server: for torchvision the folder URL replacing
        ``https://download.pytorch.org/models`` (else
        ``$RESNET_JAX_TORCHVISION_URL``), for the hub sources
        ``https://huggingface.co`` (else ``$HF_ENDPOINT``), e.g. a mirror.
      cache_dir: default :func:`default_cache_dir`.
      timeout: seconds to connect, and to wait for each piece of the answer.
      **options: passed to the converter, e.g. ``num_classes=0``,
        ``preprocessing=``, ``dtype=``.

    Returns:
      The converter's :class:`~resnet_jax.weights.Converted` ``(module,
      variables)`` with ``.preprocessing``.

    Raises:
      UserError: on one line, for an unknown source, name or weights; a
        download that failed (offline, unreachable, an HTTP error, a checksum
        mismatch), naming the URL, why, and the path to save the file at; or
        a cache that cannot be written (a full disk), naming the path.
      ImportError: for a ``.pth``/``.bin`` without torch installed.
    """
    cache = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == "torchvision":
        if revision != "main":
            raise UserError("pretrained: revision= is for the hub sources, not 'torchvision'.")
        return _torchvision(name, weights, endpoint, cache, timeout, options)
    if weights is not None:
        raise UserError(f"pretrained: weights= is for source='torchvision', not {source!r}.")
    if source == "huggingface":
        return _huggingface(name, revision, endpoint, cache, timeout, options)
    if source == "timm":
        return _timm(name, revision, endpoint, cache, timeout, options)
    raise UserError(f"pretrained: unknown source {source!r}; valid: {', '.join(SOURCES)}.")


# --------------------------------------------------------------------------- #
# The three sources.
# --------------------------------------------------------------------------- #


def _torchvision(name, weights, endpoint, cache, timeout, options) -> Converted:
    weights = weights or "IMAGENET1K_V1"
    if "://" in weights:  # any torchvision-layout file: the converter checks it is `name`
        try:
            model_spec(name)
        except ValueError as e:
            raise UserError(f"pretrained: {e}") from None
        url, filename = weights, weights.rsplit("/", 1)[-1]
    elif name not in TORCHVISION_FILES:
        raise UserError(
            f"pretrained: no torchvision weights for {name!r}; valid names: "
            f"{', '.join(TORCHVISION_FILES)}."
        )
    elif weights in TORCHVISION_FILES[name]:
        filename = TORCHVISION_FILES[name][weights]
        base = endpoint or os.environ.get(ENDPOINT_VARIABLES["torchvision"])
        url = f"{(base or DEFAULT_ENDPOINTS['torchvision']).rstrip('/')}/{filename}"
        options.setdefault("preprocessing", _TORCHVISION_PREPROCESSING[weights])
    else:
        raise UserError(
            f"pretrained: torchvision publishes no {weights!r} weights for {name}; valid: "
            f"{', '.join(TORCHVISION_FILES[name])}, or the URL of a .pth named <stem>-<sha256 "
            "prefix>.pth."
        )
    digest = re.search(r"-([0-9a-f]{8,64})\.\w+$", filename)
    if digest is None:
        raise UserError(
            f"pretrained: {filename!r} does not carry its checksum as torch.hub names files "
            "(<stem>-<8 or more hex digits of its sha256>.pth)."
        )
    timm_tag = {"IMAGENET1K_V1": "tv_in1k", "IMAGENET1K_V2": "tv2_in1k"}.get(weights)
    timm = f"pretrained('{name}.{timm_tag}', source='timm')"
    instead = f" The same weights as safetensors, without torch: {timm}." if timm_tag else ""
    _require_torch(f"{filename} is a PyTorch pickle", instead)
    path = os.path.join(cache, "torchvision", filename)
    if not os.path.exists(path):
        _download(url, path, timeout=timeout, expected=("sha256", digest[1]))
    return from_torchvision(path, name=name, **options)


def _huggingface(name, revision, endpoint, cache, timeout, options) -> Converted:
    repo = HUGGINGFACE_REPOS.get(name, name if "/" in name else None)
    if repo is None:
        raise UserError(
            f"pretrained: unknown Hugging Face model {name!r}; valid: "
            f"{', '.join(HUGGINGFACE_REPOS)} (microsoft/resnet-*), or a repo id 'owner/name'."
        )
    directory = _hub_repo(repo, revision, ("preprocessor_config.json",), endpoint, cache, timeout)
    return from_transformers(directory, **options)


def _timm(name, revision, endpoint, cache, timeout, options) -> Converted:
    tag = name.removeprefix("timm/")
    if not re.fullmatch(r"[\w-]+\.[\w-]+", tag):
        raise UserError(
            f"pretrained: {name!r} is not a timm pretrained tag '<architecture>.<tag>', e.g. "
            "'resnet50.a1_in1k' or 'resnet50.tv_in1k' (timm.list_pretrained('resnet*'))."
        )
    directory = _hub_repo(f"timm/{tag}", revision, (), endpoint, cache, timeout)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    # timm's config.json: {'architecture', 'num_classes', 'pretrained_cfg': {...}};
    # older ones are a single dict (timm.models._hub._parse_model_cfg).
    cfg = config.get("pretrained_cfg", config)
    options.setdefault("preprocessing", Preprocessing.from_timm(cfg))
    found = next(n for n in _WEIGHT_FILES if os.path.exists(os.path.join(directory, n)))
    return from_torchvision(os.path.join(directory, found), **options)


def _require_torch(what: str, instead: str = "") -> None:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"pretrained: {what}, and reading it needs torch (pip install torch).{instead}"
        ) from e


def _hub_repo(
    repo: str,
    revision: str,
    extra: tuple[str, ...],
    endpoint: str | None,
    cache: str,
    timeout: float,
) -> str:
    """The cache folder of one commit of a hub repo: its config.json, ``extra`` and weights.

    The hub resolves a branch or tag on every request, so files fetched from
    ``resolve/main`` at different times may belong to different commits. As
    huggingface_hub does, the first answer's ``X-Repo-Commit`` names the
    commit, every other file is fetched from ``resolve/<commit>``, the files
    go to ``<repo>/<commit>/`` and ``<repo>/refs/<revision>`` records the
    commit, so no later call can pair files of two commits. A complete folder
    (config.json and weights) is used without the network: the commit's
    (through the ref), else one named by the revision (files saved by hand, or
    fetched from a server that sends no ``X-Repo-Commit``, which can only be
    fetched by the revision). Optional files (``extra``; a 404 skips one) are
    fetched only with the weights.
    """
    root = os.path.join(cache, "huggingface", *repo.split("/"))
    by_name = revision.replace("/", "--")
    ref = os.path.join(root, "refs", by_name)
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(ref)
    for name in dict.fromkeys(n for n in (commit, by_name) if n):
        directory = os.path.join(root, name)
        if _has_weights(directory) and os.path.exists(os.path.join(directory, "config.json")):
            return directory
    base = endpoint or os.environ.get(ENDPOINT_VARIABLES["huggingface"])
    base = (base or DEFAULT_ENDPOINTS["huggingface"]).rstrip("/")
    files = ", ".join(("config.json", *extra))
    hint = f"the repo's {files} and {_WEIGHT_FILES[0]} all go in that folder"

    def get(at: str, filename: str, optional: bool, place=None) -> Mapping[str, str] | None:
        url = f"{base}/{repo}/resolve/{urllib.parse.quote(at, safe='')}/{filename}"
        path = os.path.join(root, at.replace("/", "--"), filename)
        return _download(
            url, path, timeout=timeout, hint=hint, missing_ok=optional, folder=root, place=place
        )

    if commit is None:  # the first answer names the commit every other file comes from
        answer = get(
            revision,
            "config.json",
            optional=False,
            place=lambda meta: os.path.join(root, _commit(meta) or by_name, "config.json"),
        )
        commit = _commit(answer)
        if commit:
            _write_atomic(ref, commit.encode(), folder=root)
    at = commit or revision
    directory = os.path.join(root, at.replace("/", "--"))
    cached = _has_weights(directory)
    for filename in ("config.json", *(() if cached else extra)):
        if not os.path.exists(os.path.join(directory, filename)):
            get(at, filename, optional=filename != "config.json")
    if cached:
        return directory
    if not get(at, _WEIGHT_FILES[0], optional=True):
        _require_torch(f"{repo} has no {_WEIGHT_FILES[0]}; its {_WEIGHT_FILES[1]} is a pickle")
        get(at, _WEIGHT_FILES[1], optional=False)
    return directory


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _commit(metadata: Mapping[str, str] | None) -> str | None:
    """The answer's X-Repo-Commit, if it is a commit hash (it names a folder)."""
    commit = (metadata or {}).get("X-Repo-Commit", "")
    return commit if _COMMIT.fullmatch(commit) else None


def _read_ref(path: str) -> str | None:
    try:
        with open(path) as f:
            commit = f.read().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _has_weights(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, n)) for n in _WEIGHT_FILES)


# --------------------------------------------------------------------------- #
# One download: temporary file, checksum, rename.
# --------------------------------------------------------------------------- #

# Seconds to wait before the second and the third try, after an HTTP 429 or
# 5xx or a dropped connection. A refused connection (offline) is not retried.
_RETRY_DELAYS = (1.0, 2.0)
# A temporary file untouched this long is a killed download's (a live one's grows).
_STALE_SECONDS = 24 * 3600
# Redirects to these hosts are followed for the file's metadata, as huggingface_hub does.
_HUB_ORIGINS = frozenset(
    ("https", host, 443) for host in ("huggingface.co", "hf.co", "hub-ci.huggingface.co")
)


def _origin(url: str) -> tuple[str, str, int]:
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme, 0)
    return parsed.scheme, (parsed.hostname or "").lower(), port


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping the headers of the answers up to the first that leaves the hub.

    huggingface_hub reads a file's metadata (checksum, commit) from the last
    answer before the first redirect to another host (the storage or CDN, whose
    own ETag is not the file's sha256), following same-host redirects (a
    renamed repo) before it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hub: list[Mapping[str, str]] = []
        self.left_hub = False

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.left_hub:
            self.hub.append(headers)
            self.left_hub = _origin(newurl) not in {_origin(req.full_url), *_HUB_ORIGINS}
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _NetworkError(Exception):
    """A failed request: ``retry`` for an HTTP 429 or 5xx or a dropped connection."""

    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


def _download(
    url: str,
    path: str,
    *,
    timeout: float,
    expected: tuple[str, str] | None = None,
    hint: str = "",
    missing_ok: bool = False,
    folder: str | None = None,
    place: Callable[[Mapping[str, str]], str] | None = None,
) -> Mapping[str, str] | None:
    """Downloads ``url`` to ``path`` via a temporary file renamed once the checksum passed.

    ``expected`` is ``('sha256', hex prefix)``; None takes the checksum from
    the hub's headers. The temporary file goes in ``folder`` (default
    ``path``'s), where those of downloads killed over a day ago are removed
    first. ``place``, given the answer's metadata, may choose another final
    path than ``path`` (which errors name). The file gets the mode a new file
    gets (``0o666 & ~umask``), as huggingface_hub's cache files. Tries three
    times on an HTTP 429 or 5xx or a dropped connection.

    Returns the hub's metadata of the file (``ETag``, ``X-Linked-Etag``,
    ``X-Repo-Commit``), or None for an HTTP 404 when ``missing_ok``; raises
    UserError for anything else that goes wrong, the cache's disk named as
    the problem when writing fails.
    """
    folder = folder or os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise _cache_error(folder, e) from None
    _remove_stale_parts(folder, os.path.dirname(path))
    request = urllib.request.Request(
        url, headers={"User-Agent": "resnet_jax", "Accept-Encoding": "identity"}
    )
    for tries, delay in enumerate((*_RETRY_DELAYS, None), start=1):
        try:
            return _try_download(request, path, folder, timeout, expected, hint, missing_ok, place)
        except _NetworkError as e:
            if not e.retry or delay is None:
                after = f" ({tries} tries)" if tries > 1 else ""
                raise _failed(url, path, f"{e}{after}", hint) from None
        time.sleep(delay)
    raise AssertionError("unreachable")


def _try_download(request, path, folder, timeout, expected, hint, missing_ok, place):
    try:
        fd, temp = _new_temp(folder, os.path.basename(path))
    except OSError as e:
        raise _cache_error(folder, e) from None
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                received = _receive(request, out, timeout, missing_ok)
            if received is None:
                return None
            sha256, size, metadata = received
            kind, want = expected or _hub_checksum(request.full_url, path, metadata, hint)
            got = sha256.hexdigest() if kind == "sha256" else _git_sha1(temp, size)
            if not got.startswith(want):
                reason = f"checksum mismatch ({kind} {got}, expected {want})"
                raise _failed(request.full_url, path, reason, hint)
            final = place(metadata) if place else path
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(temp, final)
        except OSError as e:  # the disk's: _receive turns the network's into _NetworkError
            raise _cache_error(path, e) from None
        return metadata
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def _receive(request, out, timeout, missing_ok):
    """Streams the answer into ``out``: ``(sha256, size, metadata)``, or None for a missing file.

    Network failures raise _NetworkError; ``out``'s OSErrors pass through.
    """
    redirects = _Redirects()
    try:
        response = urllib.request.build_opener(redirects).open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if missing_ok and e.code == 404:
            return None
        # The hub answers 401 for a repo that does not exist, as for a private one.
        why = " (a missing, private or gated repo?)" if e.code in (401, 403) else ""
        retry = e.code == 429 or e.code >= 500
        raise _NetworkError(f"HTTP {e.code} {e.reason}{why}", retry) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _NetworkError(_reason(e, timeout), _dropped(e)) from None
    with response:
        sha256, size = hashlib.sha256(), 0
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise _NetworkError(_reason(e, timeout), _dropped(e)) from None
            if not chunk:
                break
            out.write(chunk)
            sha256.update(chunk)
            size += len(chunk)
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) != size:
            raise _NetworkError(f"the connection dropped after {size} of {length} bytes", True)
        chain = redirects.hub if redirects.left_hub else [*redirects.hub, response.headers]
    return sha256, size, _metadata(chain)


def _metadata(chain: list[Mapping[str, str]]) -> dict[str, str]:
    """The file's metadata from the hub's answers (the last, or a same-host redirect before it)."""
    found = {"ETag": chain[-1].get("ETag") or ""}
    for key in ("X-Linked-Etag", "X-Repo-Commit"):
        found[key] = next((h[key] for h in reversed(chain) if h.get(key)), "")
    return found


def _hub_checksum(url, path, metadata, hint) -> tuple[str, str]:
    """As huggingface_hub.file_download.get_hf_file_metadata reads it (see pretrained)."""
    linked = metadata["X-Linked-Etag"]
    etag = (linked or metadata["ETag"]).removeprefix("W/").strip('"')
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return "sha256", etag
    if re.fullmatch(r"[0-9a-f]{40}", etag) and not linked:
        return "git-sha1", etag
    raise _failed(
        url, path, f"the server sent no checksum (X-Linked-Etag/ETag {etag!r}) to verify", hint
    )


def _new_temp(folder: str, name: str) -> tuple[int, str]:
    """A new temporary file in ``folder``, created 0o666 less the umask (mkstemp's are 0o600)."""
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.part")
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp


def _write_atomic(path: str, data: bytes, folder: str) -> None:
    try:
        fd, temp = _new_temp(folder, os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
    except OSError as e:
        raise _cache_error(path, e) from None


def _remove_stale_parts(*folders: str) -> None:
    """Removes the temporary files of downloads killed (untouched) over a day ago."""
    cutoff = time.time() - _STALE_SECONDS
    for folder in dict.fromkeys(folders):
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if not (entry.name.startswith(".") and entry.name.endswith(".part")):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.remove(entry.path)


def _git_sha1(path: str, size: int) -> str:
    """``git hash-object``: the sha1 of ``b'blob <size>\\0'`` and the content."""
    sha1 = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha1.update(chunk)
    return sha1.hexdigest()


def _dropped(e: BaseException) -> bool:
    """A connection reset or closed mid-answer (worth a retry); not a refused one (offline)."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    dropped = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
    return isinstance(reason, (*dropped, http.client.IncompleteRead))


def _reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)) or "timed out" in str(e):
        return f"no answer within {timeout:g} s"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({e.reason})"
    return f"{type(e).__name__}: {e}"


def _failed(url: str, path: str, reason: str, hint: str) -> UserError:
    where = f"{path} ({hint})" if hint else path
    return UserError(
        one_line(
            f"pretrained: could not download {url}: {reason}. Nothing was saved; offline, "
            f"download the file yourself and save it as {where}."
        )
    )


def _cache_error(path: str, e: OSError) -> UserError:
    """Writing the cache failed: the disk or the folder is the problem, not the download."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    problem = "the disk holding the cache is full" if full else "cannot write to the cache"
    return UserError(
        one_line(
            f"pretrained: {problem}: {path} ({e.strerror or e}); free space, or pass "
            "cache_dir= or set RESNET_JAX_CACHE to a writable folder with room for the file."
        )
    )
