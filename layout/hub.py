"""A model named by a hub repo id (``org/name[@revision]``): fetch only the files a part of it needs.

huggingface_hub does the downloading, unchanged, into its standard cache (``HF_HUB_CACHE``), with its
progress bars and its endpoint (``HF_ENDPOINT``). What is fetched: the config, the generation config
and tokenizer files that exist, the safetensors index, and only the shards that hold tensors of the
part (a peer's blocks; the client's embeddings, final norm and head). Which tensors belong to block i
is read from the checkpoint's own names: the block stack's attribute (``layers``, ``h``; found on the
model built on the meta device) followed by ``.i.``. If some block's tensors cannot be found that way,
every shard is fetched (correct, just larger); loading itself stays transformers' (``layout.load_part``
raises if a needed tensor is missing).

``from_pretrained`` expects every shard its index names, so a part is loaded from a *view*: a folder of
links to the fetched files with an index trimmed to them, under ``$SWARMLLM_CACHE/parts`` (default
``~/.cache/swarmllm/parts``), written
into a temporary folder and renamed into place (never half-written). A failed download (unknown repo,
revision or file, full disk) raises HubError naming the fix and removes huggingface_hub's partial
``.incomplete`` files of that repo.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable

from layout.errors import HubError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
METADATA_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DISK_MARGIN = 2**30  # bytes left free after a download
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9._\-]+(@[A-Za-z0-9._\-/]+)?$")


def is_hub_id(model: str) -> bool:
    """True for 'org/name' or 'org/name@revision' that is not an existing local path."""
    return not os.path.exists(model) and bool(_REPO_RE.match(model))


def split_id(model: str) -> tuple[str, str | None]:
    repo_id, _, revision = model.partition("@")
    return repo_id, revision or None


def _endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import; a process forked from a warm
    interpreter, or a test, may set it later)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _cache_dir() -> str:
    """HF_HUB_CACHE as set now (see _endpoint), else huggingface_hub's standard cache."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _views_dir() -> str:
    root = os.environ.get("SWARMLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swarmllm")
    return os.path.join(root, "parts")


def _clean_partial(repo_id: str) -> None:
    """Remove huggingface_hub's partial downloads of ``repo_id`` (nothing half-written stays behind)."""
    blobs = os.path.join(_cache_dir(), "models--" + repo_id.replace("/", "--"), "blobs")
    if os.path.isdir(blobs):
        for name in os.listdir(blobs):
            if name.endswith(".incomplete"):
                try:
                    os.remove(os.path.join(blobs, name))
                except OSError:
                    pass


def _download(repo_id: str, revision: str | None, filename: str, *, optional: bool = False,
              dry_run: bool = False):
    """hf_hub_download with errors turned into HubError (None for a missing ``optional`` file)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return hf_hub_download(repo_id, filename, revision=revision, dry_run=dry_run, endpoint=_endpoint(),
                               cache_dir=_cache_dir())
    except GatedRepoError:
        raise HubError(f"{where} is gated: accept its terms on the hub, then `hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"no model {repo_id!r} on the hub at {_endpoint()}: check the id (org/name), "
                       "or pass a local checkpoint folder") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} on {_endpoint()}: name a branch, tag or "
                       "commit that exists") from None
    except LocalEntryNotFoundError as e:
        raise HubError(f"could not reach {_endpoint()} for {where}/{filename} and it is not cached ({e}); "
                       "check the network or HF_ENDPOINT") from None
    except EntryNotFoundError:
        if optional:
            return None
        _clean_partial(repo_id)
        raise HubError(f"{where} has no file {filename!r} although its index names it: the repo is incomplete; "
                       "use another revision or a local copy") from None
    except OSError as e:
        _clean_partial(repo_id)
        if e.errno == errno.ENOSPC:
            raise HubError(f"the disk under {_cache_dir()} filled up while fetching {where}/{filename}: free space "
                           "or point HF_HUB_CACHE at a larger disk") from None
        if isinstance(e, HfHubHTTPError):
            raise HubError(f"fetching {where}/{filename} from {_endpoint()} failed: {e}") from None
        raise
    except BaseException:
        _clean_partial(repo_id)
        raise


def fetch_metadata(model: str) -> str:
    """Fetch the config, generation config, tokenizer files and index; returns the snapshot folder."""
    repo_id, revision = split_id(model)
    config_path = _download(repo_id, revision, "config.json")
    for name in METADATA_FILES[1:] + TOKENIZER_FILES:
        _download(repo_id, revision, name, optional=True)
    _download(repo_id, revision, INDEX_FILE, optional=True)
    return os.path.dirname(config_path)


def block_index_rule(stack_attr: str) -> Callable[[str], int | None]:
    """tensor name -> block index, for checkpoint names containing '<stack_attr>.<i>.' (None otherwise)."""
    pattern = re.compile(rf"(?:^|\.){re.escape(stack_attr)}\.(\d+)\.")

    def block_of(name: str) -> int | None:
        match = pattern.search(name)
        return int(match.group(1)) if match else None

    return block_of


def shards_for(weight_map: dict[str, str], block_of: Callable[[str], int | None], blocks: range,
               outside: bool, num_blocks: int) -> set[str]:
    """The shard files holding the tensors of ``blocks`` (and, with ``outside``, of everything that is
    not a block). Every shard when the names do not show some block: fetching too much beats failing."""
    by_block: dict[int, set[str]] = {}
    outside_files: set[str] = set()
    for name, fname in weight_map.items():
        i = block_of(name)
        if i is None:
            outside_files.add(fname)
        else:
            by_block.setdefault(i, set()).add(fname)
    if set(by_block) != set(range(num_blocks)):
        logger.info("the checkpoint's tensor names do not show each block; fetching every shard")
        return set(weight_map.values())
    wanted = set(outside_files) if outside else set()
    for i in blocks:
        wanted |= by_block[i]
    return wanted


def _check_disk(repo_id: str, revision: str | None, files: Iterable[str]) -> None:
    """Raise HubError before downloading if the cache's disk cannot take ``files`` plus a margin."""
    needed = 0
    for fname in files:
        info = _download(repo_id, revision, fname, dry_run=True)
        if info.will_download and info.file_size:
            needed += info.file_size
    os.makedirs(_cache_dir(), exist_ok=True)
    free = shutil.disk_usage(_cache_dir()).free
    if needed + DISK_MARGIN > free:
        raise HubError(f"fetching {needed / 2**30:.2f} GiB of {repo_id} needs more than the {free / 2**30:.2f} GiB "
                       f"free under {_cache_dir()} (keeping {DISK_MARGIN / 2**30:.0f} GiB spare): free space or "
                       "point HF_HUB_CACHE at a larger disk")


def fetch_part(model: str, stack_attr: str, num_blocks: int, blocks: range, *, outside: bool,
               snapshot: str | None = None) -> str:
    """Fetch what a part of ``model`` needs and return a local folder ``from_pretrained`` can load it from
    (``snapshot``: the folder ``fetch_metadata`` already returned, if the caller has it)."""
    repo_id, revision = split_id(model)
    snapshot = snapshot or fetch_metadata(model)
    index_path = os.path.join(snapshot, INDEX_FILE)
    if not os.path.isfile(index_path):
        _check_disk(repo_id, revision, [SINGLE_FILE])
        _download(repo_id, revision, SINGLE_FILE)
        return snapshot  # one file holds everything: the snapshot is complete
    with open(index_path) as f:
        index = json.load(f)
    weight_map: dict[str, str] = index["weight_map"]
    files = sorted(shards_for(weight_map, block_index_rule(stack_attr), blocks, outside, num_blocks))
    _check_disk(repo_id, revision, files)
    for fname in files:
        _download(repo_id, revision, fname)
    logger.info("fetched %d of %d shards of %s", len(files), len(set(weight_map.values())), model)
    return _view(snapshot, index, files)


def _view(snapshot: str, index: dict, files: list[str]) -> str:
    """A folder of links to the snapshot's metadata and ``files``, with the index trimmed to them."""
    kept = set(files)
    trimmed = {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if v in kept}}
    key = hashlib.sha256(json.dumps([os.path.realpath(snapshot), sorted(kept)]).encode()).hexdigest()[:16]
    views = _views_dir()
    target = os.path.join(views, key)
    if os.path.isfile(os.path.join(target, INDEX_FILE)):
        return target
    os.makedirs(views, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".view-", dir=views)
    try:
        for name in os.listdir(snapshot):
            if name != INDEX_FILE and (name in kept or not name.endswith(".safetensors")):
                os.symlink(os.path.realpath(os.path.join(snapshot, name)), os.path.join(staging, name))
        with open(os.path.join(staging, INDEX_FILE), "w") as f:
            json.dump(trimmed, f)
        try:
            os.replace(staging, target)
        except OSError:  # another process made the same view meanwhile
            if not os.path.isfile(os.path.join(target, INDEX_FILE)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
