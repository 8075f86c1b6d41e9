"""tests/hubserver.py stands in for the Hub: unchanged huggingface_hub downloads from it into its standard cache,
fetches only what is asked for, and raises the Hub's own exceptions for unknown repos, revisions and files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.file_download import http_get
from safetensors.torch import save_file

from tests.hubserver import HubServer

REPO = "org/tiny"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
FILES = sorted(("config.json", *SHARDS, "extra/notes.txt"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A tiny checkpoint: a config, two safetensors shards and a file in a subfolder ('/' in its name)."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "extra").mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    save_file({"a": torch.arange(16, dtype=torch.float32)}, str(ckpt / SHARDS[0]))
    save_file({"b": torch.ones(4, 4)}, str(ckpt / SHARDS[1]))
    (ckpt / "extra" / "notes.txt").write_text("nested\n")
    return ckpt


@pytest.fixture
def server(folder: Path):
    with HubServer() as hub:
        hub.add_repo(REPO, str(folder))
        yield hub


@pytest.fixture
def cache(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's huggingface_hub pointed at the server, caching under tmp_path."""
    cache_dir = tmp_path / "hub-cache"
    server.patch(monkeypatch, cache_dir)
    return cache_dir


def _snapshot(cache: Path, sha: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / sha


def test_config_lands_in_the_standard_cache_layout(server: HubServer, cache: Path, folder: Path) -> None:
    sha = server.add_repo(REPO, str(folder))  # same folder, same revision: same sha
    path = Path(hf_hub_download(REPO, "config.json"))
    assert path == _snapshot(cache, sha) / "config.json"
    assert path.read_bytes() == (folder / "config.json").read_bytes()
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == sha
    assert len(path.resolve().name) == 40  # a git blob sha1, as the Hub gives non-LFS files
    assert server.fetched(REPO) == {"config.json"}


def test_one_shard_fetches_exactly_that_shard(server: HubServer, cache: Path, folder: Path) -> None:
    data = (folder / SHARDS[1]).read_bytes()
    path = Path(hf_hub_download(REPO, SHARDS[1]))
    assert path.read_bytes() == data
    assert path.resolve().name == hashlib.sha256(data).hexdigest()  # LFS: the blob is named by its sha256
    assert server.fetched(REPO) == {SHARDS[1]}
    nested = Path(hf_hub_download(REPO, "extra/notes.txt"))
    assert nested.read_text() == "nested\n"
    assert server.fetched(REPO) == {SHARDS[1], "extra/notes.txt"}


def test_metadata_is_a_head_without_body(server: HubServer, cache: Path, folder: Path) -> None:
    sha = server.add_repo(REPO, str(folder))
    meta = get_hf_file_metadata(hf_hub_url(REPO, SHARDS[0]))
    data = (folder / SHARDS[0]).read_bytes()
    assert (meta.commit_hash, meta.etag, meta.size) == (sha, hashlib.sha256(data).hexdigest(), len(data))
    assert meta.xet_file_data is None
    assert server.fetched(REPO) == set()
    assert ("HEAD", f"/{REPO}/resolve/main/{SHARDS[0]}") in server.requests


def test_revisions_by_name_and_by_sha(server: HubServer, cache: Path, folder: Path) -> None:
    main_sha = server.add_repo(REPO, str(folder))
    v1_sha = server.add_repo(REPO, str(folder), revision="v1")
    assert v1_sha != main_sha and len(v1_sha) == 40
    path = Path(hf_hub_download(REPO, "config.json", revision="v1"))
    assert path == _snapshot(cache, v1_sha) / "config.json"
    assert (cache / "models--org--tiny" / "refs" / "v1").read_text() == v1_sha
    by_sha = Path(hf_hub_download(REPO, SHARDS[0], revision=main_sha))
    assert by_sha == _snapshot(cache, main_sha) / SHARDS[0]
    assert ("GET", f"/{REPO}/resolve/{main_sha}/{SHARDS[0]}") in server.requests


@pytest.mark.parametrize("repo, revision, filename, error", [
    ("org/missing", "main", "config.json", RepositoryNotFoundError),
    (REPO, "nope", "config.json", RevisionNotFoundError),
    (REPO, "main", "missing.json", RemoteEntryNotFoundError),
])
def test_unknown_repo_revision_file_raise_the_hubs_errors(server: HubServer, cache: Path, repo: str, revision: str,
                                                          filename: str, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        hf_hub_download(repo, filename, revision=revision)
    assert type(raised.value) is error  # not a subclass such as GatedRepoError, nor a LocalEntryNotFoundError
    if error is RemoteEntryNotFoundError:
        assert isinstance(raised.value, EntryNotFoundError)
        assert not isinstance(raised.value, LocalEntryNotFoundError)
    assert server.fetched(REPO) == set()


def test_model_info_and_file_listing(server: HubServer, cache: Path, folder: Path) -> None:
    sha = server.add_repo(REPO, str(folder))
    v1_sha = server.add_repo(REPO, str(folder), revision="v1")
    api = HfApi()
    info = api.model_info(REPO)
    assert info.sha == sha and sorted(s.rfilename for s in info.siblings) == FILES
    assert api.model_info(REPO, revision="v1").sha == v1_sha
    assert sorted(api.list_repo_files(REPO)) == FILES
    assert sorted(api.list_repo_files(REPO, revision="v1")) == FILES
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert top == {"config.json", *SHARDS, "extra"}
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(REPO, revision="nope")


def test_range_resume_gets_the_rest(server: HubServer, cache: Path, folder: Path) -> None:
    data = (folder / SHARDS[0]).read_bytes()
    request = urllib.request.Request(hf_hub_url(REPO, SHARDS[0]), headers={"Range": "bytes=10-"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 206
        assert reply.headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
        assert reply.read() == data[10:]
    buf = io.BytesIO(data[:10])
    buf.seek(10)
    http_get(hf_hub_url(REPO, SHARDS[0]), buf, resume_size=10, expected_size=len(data))
    assert buf.getvalue() == data


def test_subprocess_downloads_through_hf_endpoint(server: HubServer, tmp_path: Path, folder: Path) -> None:
    sha = server.add_repo(REPO, str(folder))
    cache_dir = tmp_path / "child-cache"
    code = f"from huggingface_hub import hf_hub_download; print(hf_hub_download({REPO!r}, 'config.json'))"
    done = subprocess.run([sys.executable, "-c", code], env=server.env(cache_dir), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == _snapshot(cache_dir, sha) / "config.json"
    assert path.read_bytes() == (folder / "config.json").read_bytes()
    assert server.fetched(REPO) == {"config.json"}
    assert os.environ.get("HF_ENDPOINT") != server.endpoint  # the parent's environment is untouched
