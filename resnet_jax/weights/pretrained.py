"""Downloads published ResNet weights with the field's own libraries, then converts them.

:func:`pretrained` (re-exported as ``rj.weights.pretrained``) is the one
function of resnet_jax that touches the network; the converters of
:mod:`resnet_jax.weights` never do. It downloads nothing itself: the hub
sources go through huggingface_hub, torchvision's through torch.hub, each
into its library's own cache.

Sources:

* ``'torchvision'``: ``name`` in resnet18/34/50/101/152,
  resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
  wide_resnet101_2 (``weights``: 'IMAGENET1K_V1' or, where published,
  'IMAGENET1K_V2'); the ``.pth`` of ``torchvision.models.*_Weights``, through
  ``torch.hub.load_state_dict_from_url(check_hash=True)`` (the hex digits
  after the '-' of the file name must start its sha256) into torch.hub's
  cache, ``$TORCH_HOME/hub/checkpoints``, which torchvision shares. Needs
  torch; without it, the error names timm's safetensors copies of the
  same weights (``source='timm'``, below). Converted by
  ``from_torchvision``.
* ``'huggingface'``: ``name`` in resnet18 ... resnet152 (the repos
  ``microsoft/resnet-18`` ... ``-152``) or any repo id ``'owner/name'`` of
  a transformers ResNet; ``config.json``, ``preprocessor_config.json`` (if
  the repo has one) and ``model.safetensors`` (else ``pytorch_model.bin``,
  which needs torch). Converted by ``from_transformers``.
* ``'timm'``: ``name`` is a timm pretrained tag of a ResNet that
  :func:`~resnet_jax.weights.from_timm` reads, e.g. ``'resnet50.a1_in1k'``,
  ``'resnet50d.ra2_in1k'``, ``'seresnext50_32x4d.racm_in1k'``,
  ``'resnetv2_50.a1h_in1k'``, or ``'resnet50.tv_in1k'`` / ``'tv2_in1k'``
  (torchvision's V1/V2 weights): the hub repo ``timm/<name>``, its
  ``config.json`` and ``model.safetensors``, read without torch.
  Converted by ``from_timm`` (checked against the architecture the tag
  names, where resnet_jax names it too) with
  ``Preprocessing.from_timm(config['pretrained_cfg'])``.

Hub files go through ``huggingface_hub.hf_hub_download`` into its cache
(``$HF_HUB_CACHE``, default ``$HF_HOME/hub``), with its progress bar, its
token (``HF_TOKEN`` or ``hf auth login``), its server (``$HF_ENDPOINT``) and
its checks: it asks the hub for
each file's commit and checksum (a HEAD request) and downloads only a file it
lacks. With ``HF_HUB_OFFLINE=1`` the cached files are used without a request,
and so they are when the hub cannot be reached. Files cached by transformers
or timm are the same files, used as they are. All files of one call come from
one commit: the one the first (``config.json``) resolves to. Every hub file
read is checked against the checksum its cache entry is named by (the sha256,
or git blob sha1, the hub sent): a corrupt one is refused, naming it.

Both libraries are imported inside the functions that use them, so
``import resnet_jax`` still needs only jax and flax. Every failure is one
line (:class:`~resnet_jax.errors.UserError`) naming the file and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shlex
import urllib.error
import urllib.parse
import warnings
from typing import Any

from resnet_jax.errors import UserError, one_line
from resnet_jax.models import list_models, model_spec
from resnet_jax.weights.hf_layout import from_transformers
from resnet_jax.weights.preprocessing import Converted, Preprocessing
from resnet_jax.weights.timm_layout import from_timm
from resnet_jax.weights.torch_layout import CONVERTER_OPTIONS, from_torchvision

SOURCES = ("torchvision", "huggingface", "timm")
# torchvision.models.ResNet*_Weights' URLs (torchvision 0.29): TORCHVISION_URL/<file>.
TORCHVISION_URL = "https://download.pytorch.org/models"
TORCHVISION_URL_VARIABLE = "RESNET_JAX_TORCHVISION_URL"  # a mirror of TORCHVISION_URL
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
    "resnext50_32x4d": {
        "IMAGENET1K_V1": "resnext50_32x4d-7cdf4587.pth",
        "IMAGENET1K_V2": "resnext50_32x4d-1a0047aa.pth",
    },
    "resnext101_32x8d": {
        "IMAGENET1K_V1": "resnext101_32x8d-8ba56ff5.pth",
        "IMAGENET1K_V2": "resnext101_32x8d-110c445d.pth",
    },
    "resnext101_64x4d": {"IMAGENET1K_V1": "resnext101_64x4d-173b62eb.pth"},
    "wide_resnet50_2": {
        "IMAGENET1K_V1": "wide_resnet50_2-95faca4d.pth",
        "IMAGENET1K_V2": "wide_resnet50_2-9ba9bcbe.pth",
    },
    "wide_resnet101_2": {
        "IMAGENET1K_V1": "wide_resnet101_2-32ee1156.pth",
        "IMAGENET1K_V2": "wide_resnet101_2-d733dc28.pth",
    },
}
TORCHVISION_PREPROCESSING = {"IMAGENET1K_V1": "torchvision", "IMAGENET1K_V2": "torchvision-v2"}
# timm's safetensors copies of torchvision's weights: the hub repo timm/<name>.<tag>.
TIMM_TAGS = {"IMAGENET1K_V1": "tv_in1k", "IMAGENET1K_V2": "tv2_in1k"}
HUGGINGFACE_REPOS = {
    name: f"microsoft/resnet-{name[6:]}" for name in TORCHVISION_FILES if name[6:].isdigit()
}
# A hub repo's weights: the first of these it has.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# torch.hub's check_hash reads the sha256 prefix so (torch.hub.HASH_REGEX).
_TORCH_HUB_HASH = re.compile(r"-([a-f0-9]*)\.")
# The disk's errors while writing a cache (not the network's).
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)


def pretrained(
    name: str,
    source: str = "torchvision",
    *,
    weights: str | None = None,
    revision: str = "main",
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> Converted:
    """Downloads published weights (once, into the library's standard cache) and converts them.

    >>> model, variables = rj.weights.pretrained("resnet50", source="torchvision")

    Sources (the module's documentation says which names each takes, where
    the files go and how they are checked): ``'torchvision'`` (the ``.pth``
    of ``torchvision.models.*_Weights`` through torch.hub; needs torch),
    ``'huggingface'`` (a transformers ResNet repo) and ``'timm'`` (a timm
    pretrained tag, read without torch).

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
      endpoint: the server: for the hub sources, instead of ``$HF_ENDPOINT``
        (default ``https://huggingface.co``), e.g. a mirror; for torchvision,
        the folder URL instead of ``$RESNET_JAX_TORCHVISION_URL`` (default
        ``https://download.pytorch.org/models``).
      cache_dir: a folder instead of the standard caches: the hub's cache
        (``$HF_HUB_CACHE``) and torch.hub's ``model_dir``
        (``$TORCH_HOME/hub/checkpoints``), as timm's ``cache_dir``.
      **options: passed to the converter, e.g. ``num_classes=0``,
        ``preprocessing=``, ``dtype=``; checked before anything is downloaded.

    Returns:
      The converter's :class:`~resnet_jax.weights.Converted` ``(module,
      variables)`` with ``.preprocessing``.

    Raises:
      UserError: on one line, for an unknown source, name, weights or option;
        a .pth/.bin without torch; a download that failed (offline, not
        cached, unreachable, an HTTP error, a missing repo, revision or file,
        a checksum mismatch), naming the file and how to get it; a cached
        file that is corrupt, naming it; or a cache that cannot be written.
    """
    _check_options(source, options)
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    if source == "torchvision":
        if revision != "main":
            raise UserError("pretrained: revision= is for the hub sources, not 'torchvision'.")
        return _torchvision(name, weights or "IMAGENET1K_V1", endpoint, cache, options)
    if weights is not None:
        raise UserError(f"pretrained: weights= is for source='torchvision', not {source!r}.")
    if source == "huggingface":
        return _huggingface(name, revision, endpoint, cache, options)
    if source == "timm":
        return _timm(name, revision, endpoint, cache, options)
    raise UserError(f"pretrained: unknown source {source!r}; valid: {', '.join(SOURCES)}.")


def _check_options(source: str, options: dict[str, Any]) -> None:
    """Raises UserError for a converter option ``pretrained`` does not pass on."""
    allowed = {"num_classes", "preprocessing", *CONVERTER_OPTIONS}
    unknown = sorted(set(options) - allowed - ({"config"} if source == "huggingface" else set()))
    if unknown:
        gone = " (timeout= is gone: set HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT)"
        raise UserError(
            f"pretrained: unknown option(s) {unknown}{gone if 'timeout' in unknown else ''}; "
            f"valid: weights, revision, endpoint, cache_dir, {', '.join(sorted(allowed))}."
        )


# --------------------------------------------------------------------------- #
# torchvision: torch.hub.
# --------------------------------------------------------------------------- #


def _torchvision(name, weights, endpoint, cache_dir, options) -> Converted:
    if "://" in weights:  # any torchvision-layout file: the converter checks it is `name`
        try:
            model_spec(name)
        except ValueError as e:
            raise UserError(one_line(f"pretrained: {e}")) from None
        url = weights
    elif name not in TORCHVISION_FILES:
        raise UserError(
            f"pretrained: no torchvision weights for {name!r}; valid names: "
            f"{', '.join(TORCHVISION_FILES)}."
        )
    elif weights in TORCHVISION_FILES[name]:
        base = endpoint or os.environ.get(TORCHVISION_URL_VARIABLE) or TORCHVISION_URL
        url = f"{base.rstrip('/')}/{TORCHVISION_FILES[name][weights]}"
        options.setdefault("preprocessing", TORCHVISION_PREPROCESSING[weights])
    else:
        raise UserError(
            f"pretrained: torchvision publishes no {weights!r} weights for {name}; valid: "
            f"{', '.join(TORCHVISION_FILES[name])}, or the URL of a .pth named <stem>-<sha256 "
            "prefix>.pth."
        )
    filename = os.path.basename(urllib.parse.urlsplit(url).path)
    digest = _TORCH_HUB_HASH.search(filename)
    if digest is None or len(digest[1]) < 8:
        raise UserError(
            f"pretrained: {filename!r} does not carry its checksum as torch.hub names files "
            "(<stem>-<8 or more hex digits of its sha256>.pth)."
        )
    tag = TIMM_TAGS.get(weights)
    instead = (
        f" timm's safetensors copy of the same weights (the hub repo timm/{name}.{tag}) needs "
        f"no torch: pretrained('{name}.{tag}', source='timm')."
        if tag
        else ""
    )
    try:
        # torch only here, to read the .pth: `import resnet_jax` needs only jax and flax.
        import torch
    except ImportError:
        raise UserError(
            f"pretrained: {filename} is a PyTorch pickle, and reading it needs torch (pip "
            f"install torch).{instead}"
        ) from None
    model_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(model_dir, filename)
    cached = os.path.exists(path)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, model_dir=model_dir, map_location="cpu", check_hash=True, weights_only=True
        )
    except Exception as e:
        error = _torch_hub_error(e, url, path, cached)
        if error is None:
            raise
        raise error from None
    return from_torchvision(state, name=name, **options)


def _torch_hub_error(e: Exception, url: str, path: str, cached: bool) -> UserError | None:
    """torch.hub's failure as one line, or None for what is not the download's nor the cache's."""
    if cached:  # nothing was downloaded: torch.load could not read the cached file
        return UserError(
            one_line(
                f"pretrained: {path} (torch.hub's cache) cannot be read ({type(e).__name__}: "
                f"{e}): a truncated or corrupt file; delete it and call again to download it anew."
            )
        )
    if isinstance(e, RuntimeError) and "invalid hash value" in str(e):
        return UserError(
            one_line(
                f"pretrained: checksum mismatch for {url}: torch.hub's {e}; the file name's "
                f"sha256 prefix does not match its bytes. Nothing was saved at {path}."
            )
        )
    if isinstance(e, urllib.error.HTTPError):
        reason = f"HTTP {e.code} {e.reason}"
    elif isinstance(e, urllib.error.URLError):
        reason = f"cannot connect ({e.reason})"
    elif isinstance(e, OSError) and e.errno in _DISK_ERRORS:
        return _cache_error(path, e, "TORCH_HOME")
    elif isinstance(e, (OSError, http.client.HTTPException)):
        reason = f"{type(e).__name__}: {e}"
    else:
        return None
    return UserError(
        one_line(
            f"pretrained: could not download {url}: {reason}. Nothing was saved; offline, "
            f"download that file elsewhere and save it as {path}."
        )
    )


def _cache_error(path: str, e: OSError, variable: str) -> UserError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    problem = "the disk holding the cache is full" if full else "cannot write to the cache"
    return UserError(
        one_line(
            f"pretrained: {problem}: {path} ({e.strerror or e}); free space, or pass cache_dir= "
            f"or set {variable} to a writable folder with room for the file."
        )
    )


# --------------------------------------------------------------------------- #
# The hub sources: huggingface_hub.
# --------------------------------------------------------------------------- #


def _huggingface(name, revision, endpoint, cache_dir, options) -> Converted:
    repo = HUGGINGFACE_REPOS.get(name, name if "/" in name else None)
    if repo is None:
        raise UserError(
            f"pretrained: unknown Hugging Face model {name!r}; valid: "
            f"{', '.join(HUGGINGFACE_REPOS)} (microsoft/resnet-*), or a repo id 'owner/name'."
        )
    files = ("config.json", "preprocessor_config.json", WEIGHT_FILES[0])
    hub = _HubRepo(repo, revision, endpoint, cache_dir, files)
    directory = os.path.dirname(hub.get("config.json"))
    if "preprocessing" not in options:
        try:
            hub.get("preprocessor_config.json", optional=True)
        except _NotCached:
            warnings.warn(
                f"pretrained: {repo}'s preprocessor_config.json is not cached and the hub "
                "cannot be reached: using PREPROCESSING['huggingface'] (pass preprocessing= "
                "to choose).",
                stacklevel=3,
            )
    _hub_weights(hub)
    return from_transformers(directory, **options)


def _timm(name, revision, endpoint, cache_dir, options) -> Converted:
    tag = name.removeprefix("timm/")
    if not re.fullmatch(r"[\w-]+\.[\w-]+", tag):
        raise UserError(
            f"pretrained: {name!r} is not a timm pretrained tag '<architecture>.<tag>', e.g. "
            "'resnet50.a1_in1k' or 'resnet50.tv_in1k' (timm.list_pretrained('resnet*'))."
        )
    hub = _HubRepo(f"timm/{tag}", revision, endpoint, cache_dir, ("config.json", WEIGHT_FILES[0]))
    if "preprocessing" not in options:
        try:
            with open(hub.get("config.json")) as f:
                config = json.load(f)
            # timm's config.json: {'architecture', 'num_classes', 'pretrained_cfg': {...}};
            # older ones are a single dict, as timm's own loader reads them.
            cfg = config.get("pretrained_cfg", config)
        except _NotCached:  # timm caches only the weights: its own table has the rest
            cfg = _timm_registry_cfg(tag)
            if cfg is None:
                raise
        options["preprocessing"] = Preprocessing.from_timm(cfg)
    architecture = tag.split(".")[0]
    name = architecture if architecture in list_models() else None
    return from_timm(_hub_weights(hub), name, **options)


def _timm_registry_cfg(tag: str) -> dict[str, Any] | None:
    """timm's own pretrained_cfg of ``tag``, if timm is installed and knows it."""
    try:
        # timm (and torch with it) only offline, for weights timm cached without config.json.
        from timm.models import get_pretrained_cfg
    except ImportError:
        return None
    try:
        cfg = get_pretrained_cfg(tag)
    except RuntimeError:  # an architecture timm has, without this tag
        return None
    return cfg.to_dict() if cfg is not None else None


def _hub_weights(hub: _HubRepo) -> str:
    """The path of the repo's model.safetensors, else (needing torch) its pytorch_model.bin."""
    path = hub.get(WEIGHT_FILES[0], optional=True)
    if path is not None:
        return path
    try:
        # torch is only checked for (not used) here: `import resnet_jax` needs only jax and flax.
        import torch  # noqa: F401
    except ImportError:
        raise UserError(
            f"pretrained: {hub.repo} has no {WEIGHT_FILES[0]}; its {WEIGHT_FILES[1]} is a "
            "PyTorch pickle, and reading it needs torch (pip install torch)."
        ) from None
    return hub.get(WEIGHT_FILES[1])


class _NotCached(UserError):
    """A hub file neither in the cache nor downloadable (offline, or the hub unreachable)."""


class _HubRepo:
    """The files of one revision of a hub repo, all from the commit the first one resolves to.

    ``files`` (all the call needs) only go into the command that error
    messages suggest.
    """

    def __init__(self, repo, revision, endpoint, cache_dir, files) -> None:
        self.repo, self.revision, self.endpoint = repo, revision, endpoint
        self.cache_dir, self.files = cache_dir, files
        self.at = revision  # becomes the commit once a file names it

    def get(self, filename: str, optional: bool = False) -> str | None:
        """The file's path in the cache, downloaded if need be and checked.

        None for an ``optional`` file the repo does not have; raises
        _NotCached offline for a file not cached, UserError for the rest.
        """
        # huggingface_hub lazily: `import resnet_jax` needs only jax and flax.
        import huggingface_hub
        from huggingface_hub import errors

        if optional:  # the cache may know the file is absent (its .no_exist)
            known = huggingface_hub.try_to_load_from_cache(
                self.repo, filename, cache_dir=self.cache_dir, revision=self.at
            )
            if known is not None and not isinstance(known, str):
                return None
        try:
            path = huggingface_hub.hf_hub_download(
                self.repo,
                filename,
                revision=self.at,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                library_name="resnet_jax",
            )
        except errors.LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base
            raise _NotCached(self._not_cached(filename, e)) from None
        except errors.EntryNotFoundError:
            if optional:
                return None
            raise UserError(
                f"pretrained: the Hugging Face repo {self.repo} has no {filename} at revision "
                f"{self.at!r}; is it a {self._kind()}?"
            ) from None
        except Exception as e:
            error = self._error(filename, e)
            if error is None:
                raise
            raise error from None
        snapshot = os.path.dirname(path)
        if self.at == self.revision and os.path.basename(os.path.dirname(snapshot)) == "snapshots":
            self.at = os.path.basename(snapshot)  # .../snapshots/<commit>/<filename>
        _check_blob(path, filename, self.repo)
        return path

    def _kind(self) -> str:
        return "timm model" if self.repo.startswith("timm/") else "transformers ResNet"

    def _cache(self) -> str:
        # huggingface_hub lazily: `import resnet_jax` needs only jax and flax.
        import huggingface_hub.constants

        return self.cache_dir or huggingface_hub.constants.HF_HUB_CACHE

    def _command(self) -> str:
        """The command that downloads every file of this call into the cache it reads."""
        words = ["hf", "download", self.repo, *self.files]
        if self.revision != "main":
            words += ["--revision", self.revision]
        if self.cache_dir:
            words += ["--cache-dir", self.cache_dir]
        prefix = f"HF_ENDPOINT={shlex.quote(self.endpoint)} " if self.endpoint else ""
        return prefix + shlex.join(words)

    def _not_cached(self, filename: str, e: Exception) -> str:
        # huggingface_hub lazily: `import resnet_jax` needs only jax and flax.
        import huggingface_hub.constants
        from huggingface_hub import errors

        cause = e.__cause__
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set"
        elif isinstance(cause, errors.HfHubHTTPError):
            why = f"the hub answered HTTP {cause.response.status_code}"
        else:
            why = f"the hub cannot be reached ({one_line(str(cause or e))})"
        return one_line(
            f"pretrained: {filename} of {self.repo} (revision {self.revision!r}) is not in the "
            f"Hugging Face cache {self._cache()} and {why}. Where the hub can be reached, "
            f"`{self._command()}` puts the files there; then this works offline too."
        )

    def _error(self, filename: str, e: Exception) -> UserError | None:
        """huggingface_hub's other failures as one line; None for what is neither its nor the network's."""
        # huggingface_hub lazily: `import resnet_jax` needs only jax and flax.
        from huggingface_hub import errors

        endpoint = self.endpoint or "https://huggingface.co"
        login = "log in with `hf auth login` or set HF_TOKEN"
        if isinstance(e, errors.GatedRepoError):  # before RepositoryNotFoundError, its base
            message = (
                f"the Hugging Face repo {self.repo} is gated: accept its conditions at "
                f"{endpoint}/{self.repo}, then {login}"
            )
        elif isinstance(e, errors.RepositoryNotFoundError):
            message = (
                f"no Hugging Face repo {self.repo} (or it is private or gated: {login}); is "
                f"{self.repo!r} a {self._kind()}?"
            )
        elif isinstance(e, errors.RevisionNotFoundError):
            message = f"the Hugging Face repo {self.repo} has no revision {self.revision!r}"
        elif isinstance(e, errors.OfflineModeIsEnabled):
            return _NotCached(self._not_cached(filename, e))
        elif isinstance(e, errors.HfHubHTTPError):
            status = getattr(e.response, "status_code", "?")
            message = f"downloading {filename} of {self.repo}: the hub answered HTTP {status}"
        elif isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            return _cache_error(getattr(e, "filename", None) or self._cache(), e, "HF_HUB_CACHE")
        elif isinstance(e, OSError) and "Consistency check failed" in str(e):
            message = (
                f"the download of {filename} of {self.repo} was cut short "
                f"({str(e).splitlines()[0]}); nothing was saved: call again"
            )
        elif isinstance(e, ValueError):  # e.g. huggingface_hub's HFValidationError of a repo id
            message = f"{self.repo!r} (revision {self.revision!r}): {e}"
        elif any(c.__module__.split(".")[0] in _NETWORK for c in type(e).__mro__):
            message = f"could not download {filename} of {self.repo}: {type(e).__name__}: {e}"
        else:
            return None
        return UserError(one_line(f"pretrained: {message}."))


# The HTTP libraries huggingface_hub has used (requests before 1.0, then httpx, httpx2).
_NETWORK = frozenset(("requests", "urllib3", "httpx", "httpx2", "httpcore"))


def _check_blob(path: str, filename: str, repo: str) -> None:
    """Refuses a cached hub file whose bytes do not match the checksum its blob is named by.

    The cache keeps each file as ``blobs/<ETag>``, the ETag the hub sent: the
    sha256 of an LFS file, the git blob sha1 of a small one. A file cached
    without the symlink (symlinks off), or under another kind of name, is not
    checked.
    """
    if not os.path.islink(path):
        return
    blob = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    etag = os.path.basename(blob)
    if os.path.basename(os.path.dirname(blob)) != "blobs":
        return
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        kind, digest = "sha256", hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        kind, digest = "git blob sha1", hashlib.sha1(f"blob {os.path.getsize(blob)}\0".encode())
    else:
        return
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        raise UserError(
            f"pretrained: {blob} ({filename} of {repo} in the Hugging Face cache) is truncated "
            f"or corrupt: its {kind} is {digest.hexdigest()}, not {etag}, the hub's checksum of "
            "the file. Delete it and call again to download it anew."
        )
