"""A local stand-in for the Hugging Face Hub, so tests can exercise unchanged huggingface_hub downloads offline.

Checkpoint folders are served in the Hub's URL layout on 127.0.0.1 (port chosen by the OS):

* ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{filename}``: what ``hf_hub_download`` and
  ``get_hf_file_metadata`` use. ``revision`` is a registered revision name or its commit sha; ``filename`` may
  contain ``/``. Replies carry ``X-Repo-Commit`` and ``ETag`` (sha256 for LFS-like files, which huggingface_hub
  then uses as the blob name; a git blob sha1 otherwise) and ``Content-Length``, and never a redirect or any
  ``X-Xet-*`` header, so huggingface_hub downloads the body itself by plain HTTP (with ``Range`` resume: 206).
* ``GET /api/models/{org}/{name}[/revision/{revision}]`` (``HfApi.model_info``) and
  ``GET /api/models/{org}/{name}/tree/{revision}[/{path}]`` (``list_repo_tree`` / ``list_repo_files``).
* Errors as the Hub: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``,
  which ``hf_raise_for_status`` turns into ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` /
  ``RemoteEntryNotFoundError`` (a subclass of ``EntryNotFoundError``).

Pointing huggingface_hub at it. ``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` once, at import, and ``huggingface_hub.hf_api`` builds its module-level ``api = HfApi()``
(behind ``huggingface_hub.model_info``, ``list_repo_files``...) at import too; transformers keeps its own lazily
built ``HfApi`` in ``transformers.utils.hub._hf_api``. So setting the environment variable in a running process
is not enough:

* in-process: ``server.patch(monkeypatch, cache_dir)`` sets ``constants.ENDPOINT``,
  ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url`` formats this template, it does not re-read
  ENDPOINT), ``constants.HF_HUB_OFFLINE = False`` (tests/conftest.py sets ``HF_HUB_OFFLINE=1``, which makes every
  request raise ``OfflineModeIsEnabled``), ``constants.HF_HUB_CACHE``, ``hf_api.api.endpoint`` and clears
  transformers' cached ``HfApi``; it also sets the matching environment variables for child processes.
  ``HfApi()`` objects created after the patch pick up the new endpoint; older ones keep theirs.
* subprocess: ``env=server.env(cache_dir)``, i.e. ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=0``
  (the inherited ``HF_HUB_OFFLINE=1`` would otherwise win; "0" also overrides ``TRANSFORMERS_OFFLINE``), without
  ``HUGGINGFACE_CO_STAGING`` (which replaces the endpoint). The child reads them at import: nothing to patch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Iterator

# Files the real Hub stores in LFS: their ETag is the content's sha256 (64 hex), which huggingface_hub
# uses as the blob's name in its cache. Everything else gets a git blob sha1 (40 hex), as on the Hub.
LFS_SUFFIXES: tuple[str, ...] = (".safetensors",)
_CHUNK = 1 << 20
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def commit_sha(repo_id: str, revision: str) -> str:
    """The fixed commit sha a (repo, revision) is served under: stable across runs, distinct per revision."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def _is_lfs(filename: str) -> bool:
    return filename.endswith(LFS_SUFFIXES)


class _HubError(Exception):
    """A Hub-style error reply: HTTP status plus the X-Error-Code huggingface_hub maps to an exception."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubServer:
    """Serves registered folders as Hub model repos; records every request so tests can assert what was fetched."""

    def __init__(self) -> None:
        # repo_id -> {revision name or commit sha: (commit sha, folder)}
        self._repos: dict[str, dict[str, tuple[str, str]]] = {}
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int, str], str] = {}
        self._fetched: dict[str, set[str]] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []
        self.endpoint = ""

    # -- registry -------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: str, revision: str = "main") -> str:
        """Serve ``folder`` as ``repo_id`` at ``revision`` (also reachable by the returned commit sha)."""
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
        if not os.path.isdir(folder):
            raise ValueError(f"not a folder: {folder!r}")
        sha = commit_sha(repo_id, revision)
        with self._lock:
            revisions = self._repos.setdefault(repo_id, {})
            revisions[revision] = revisions[sha] = (sha, os.path.abspath(folder))
        return sha

    def fetched(self, repo_id: str) -> set[str]:
        """Filenames of ``repo_id`` whose body was sent (GET /resolve), at any revision."""
        with self._lock:
            return set(self._fetched.get(repo_id, ()))

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # stop() must not wait on a client that keeps its socket open
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="HubServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- pointing huggingface_hub here ----------------------------------------------------------------------

    def env(self, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """os.environ for a child process that should download from this server (see the module docstring)."""
        env = {k: v for k, v in os.environ.items() if k != "HUGGINGFACE_CO_STAGING"}
        env["HF_ENDPOINT"] = self.endpoint
        env["HF_HUB_OFFLINE"] = "0"
        if cache_dir is not None:
            env["HF_HUB_CACHE"] = os.fspath(cache_dir)
        return env

    def patch(self, monkeypatch: Any, cache_dir: str | os.PathLike[str] | None = None) -> None:
        """Point this process's already-imported huggingface_hub (and transformers) here, via pytest's
        monkeypatch so everything is restored after the test."""
        from huggingface_hub import constants, hf_api

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("HUGGINGFACE_CO_STAGING", raising=False)
        if cache_dir is not None:
            monkeypatch.setattr(constants, "HF_HUB_CACHE", os.fspath(cache_dir))
            monkeypatch.setenv("HF_HUB_CACHE", os.fspath(cache_dir))
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)

    # -- lookups used by the handler ------------------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _mark_fetched(self, repo_id: str, filename: str) -> None:
        with self._lock:
            self._fetched.setdefault(repo_id, set()).add(filename)

    def _resolve(self, repo_id: str, revision: str) -> tuple[str, str]:
        """(commit sha, folder) of a repo at a revision name or commit sha, or a Hub-style 404."""
        with self._lock:
            revisions = self._repos.get(repo_id)
            found = revisions.get(revision) if revisions is not None else None
        if revisions is None:
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if found is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found

    def _hash(self, path: str, kind: str) -> str:
        """sha256 ('lfs') or git blob sha1 ('git') of a file, cached by (path, size, mtime)."""
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, kind)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is not None:
            return cached
        h = hashlib.sha256() if kind == "lfs" else hashlib.sha1(b"blob %d\0" % st.st_size)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._hashes[key] = digest
        return digest

    def _etag(self, path: str, filename: str) -> str:
        return self._hash(path, "lfs" if _is_lfs(filename) else "git")

    @staticmethod
    def _file_path(folder: str, filename: str) -> str | None:
        """The file behind a repo path, or None (no escaping the folder with '..', no folders)."""
        parts = filename.split("/")
        if not filename or any(p in ("", ".", "..") or "\\" in p for p in parts):
            return None
        path = os.path.join(folder, *parts)
        return path if os.path.isfile(path) else None

    @staticmethod
    def _walk(folder: str) -> Iterator[tuple[str, bool]]:
        """(repo path, is_dir) of everything in a folder, sorted, leaving out .git."""
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            rel = os.path.relpath(root, folder).replace(os.sep, "/")
            prefix = "" if rel == "." else rel + "/"
            for d in dirs:
                yield prefix + d, True
            for f in sorted(files):
                yield prefix + f, False

    def _entry(self, folder: str, path: str, is_dir: bool) -> dict[str, Any]:
        """A tree entry as /api/models/.../tree returns it."""
        if is_dir:
            return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0,
                    "path": path}
        full = os.path.join(folder, *path.split("/"))
        size = os.path.getsize(full)
        entry: dict[str, Any] = {"type": "file", "oid": self._hash(full, "git"), "size": size, "path": path}
        if _is_lfs(path):
            entry["lfs"] = {"oid": self._hash(full, "lfs"), "size": size, "pointerSize": 134}
        return entry


class _Handler(BaseHTTPRequestHandler):
    """One request: route /resolve and /api/models to the HubServer in self.server.hub."""

    server_version = "HubServer/1"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean; self.hub.requests has the log

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        self.hub._record(self.command, self.path)
        raw_path, _, query = self.path.partition("?")
        parts = raw_path.lstrip("/").split("/")
        try:
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = "/".join(urllib.parse.unquote(p) for p in parts[:2])
                revision = urllib.parse.unquote(parts[3])
                filename = urllib.parse.unquote("/".join(parts[4:]))
                self._resolve_file(repo_id, revision, filename, body)
            elif len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id = "/".join(urllib.parse.unquote(p) for p in parts[2:4])
                self._api(repo_id, parts[4:], urllib.parse.parse_qs(query), body)
            else:
                raise _HubError(404, None, f"no route for {raw_path}")
        except _HubError as e:
            self._send_error(e, body)

    def _send_error(self, e: _HubError, body: bool) -> None:
        payload = json.dumps({"error": e.message}).encode()
        self.send_response(e.status)
        if e.code is not None:
            self.send_header("X-Error-Code", e.code)
        self.send_header("X-Error-Message", e.message)
        if e.commit is not None:
            self.send_header("X-Repo-Commit", e.commit)  # lets huggingface_hub cache the file's absence
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _send_json(self, data: Any, commit: str, body: bool) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _resolve_file(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        sha, folder = self.hub._resolve(repo_id, revision)
        path = self.hub._file_path(folder, filename)
        if path is None:
            raise _HubError(404, "EntryNotFound", f"Entry not found: {filename}", commit=sha)
        size = os.path.getsize(path)
        start, end = 0, size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            match = _RANGE_RE.fullmatch(range_header.strip())
            if match and (match.group(1) or match.group(2)):
                first, last = match.groups()
                if first:
                    start = int(first)
                    end = min(int(last), size - 1) if last else size - 1
                else:  # suffix range: the last N bytes
                    start = max(size - int(last), 0)
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{self.hub._etag(path, filename)}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        self.hub._mark_fetched(repo_id, filename)
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left > 0 and (chunk := f.read(min(_CHUNK, left))):
                self.wfile.write(chunk)
                left -= len(chunk)

    def _api(self, repo_id: str, rest: list[str], params: dict[str, list[str]], body: bool) -> None:
        if not rest or rest[0] == "revision":
            revision = urllib.parse.unquote(rest[1]) if len(rest) > 1 else "main"
            sha, folder = self.hub._resolve(repo_id, revision)
            blobs = params.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for path, is_dir in self.hub._walk(folder):
                if is_dir:
                    continue
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry = self.hub._entry(folder, path, False)
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if "lfs" in entry:
                        lfs = entry["lfs"]
                        sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
                siblings.append(sibling)
            info = {"_id": sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                    "private": False, "gated": False, "disabled": False, "tags": [], "siblings": siblings}
            self._send_json(info, sha, body)
        elif rest[0] == "tree" and len(rest) >= 2:
            sha, folder = self.hub._resolve(repo_id, urllib.parse.unquote(rest[1]))
            base = urllib.parse.unquote("/".join(rest[2:])).strip("/")
            if base and not os.path.isdir(os.path.join(folder, *base.split("/"))):
                raise _HubError(404, "EntryNotFound", f"{base} does not exist on {sha}", commit=sha)
            recursive = params.get("recursive", ["false"])[0].lower() == "true"
            prefix = base + "/" if base else ""
            entries = []
            for path, is_dir in self.hub._walk(folder):
                if not path.startswith(prefix):
                    continue
                if not recursive and "/" in path[len(prefix):]:
                    continue
                entries.append(self.hub._entry(folder, path, is_dir))
            self._send_json(entries, sha, body)
        else:
            raise _HubError(404, None, f"no API route for {'/'.join(rest)}")
