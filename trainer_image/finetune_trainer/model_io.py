"""Where the base model comes from (final_model.py writes where the trained one goes).

hf://ORG/NAME is read with the real Hub client (revision, HF_TOKEN from the env).
s3://BUCKET/PREFIX is downloaded in parallel into a per-node cache, once per node: the workers
of a node take a file lock, the first downloads, the others find the finished copy.
file://PATH is read in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile

import pyarrow.fs as pafs

from .errors import BadInputError
from .storage import Location, S3Settings, list_files, resolve

CONFIG_FILE = "config.json"


def cache_root() -> str:
    return os.environ.get("FINETUNE_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "finetune-cache")


def _hf_repo(uri: str) -> str:
    repo = uri[len("hf://"):].strip("/")
    if not repo:
        raise BadInputError(f"{uri!r} names no Hub repository")
    return repo


def check_model(uri: str, revision: str | None, settings: S3Settings) -> None:
    """Preflight: the model's config.json is where the URI says."""
    if uri.startswith("hf://"):
        repo = _hf_repo(uri)
        where = f"{uri}{'@' + revision if revision else ''}"
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(repo, CONFIG_FILE, revision=revision or None), str):
                raise BadInputError(f"cannot fetch model {where} from the Hugging Face Hub: HF_HUB_OFFLINE "
                                    "is set and the model is not in the local Hub cache")
            return
        try:
            # One HEAD request with a timeout: unreachable Hub, unknown repo, gated model or
            # bad token all fail here in seconds, before any worker starts.
            from huggingface_hub import get_hf_file_metadata, hf_hub_url

            get_hf_file_metadata(hf_hub_url(repo, CONFIG_FILE, revision=revision or None),
                                 token=os.environ.get("HF_TOKEN") or None, timeout=15)
        except Exception as exc:  # the Hub client's message says which
            raise BadInputError(f"cannot fetch model {where} from the Hugging Face Hub: "
                                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        return
    loc = resolve(uri, settings)
    from .storage import check_bucket

    check_bucket(loc)
    try:
        info = loc.filesystem.get_file_info(f"{loc.path}/{CONFIG_FILE}")
    except OSError as exc:
        raise BadInputError(f"cannot read model {uri}: {' '.join(str(exc).split())[:300]}") from None
    if info.type != pafs.FileType.File:
        raise BadInputError(f"model {uri} not found: no {CONFIG_FILE} at {loc.uri}/{CONFIG_FILE}")
    from .model_check import check_model_files, model_files

    check_model_files(loc, model_files(loc))


def local_model_dir(uri: str, revision: str | None, settings: S3Settings) -> str:
    """A local directory (or Hub repo id) that from_pretrained can read."""
    if uri.startswith("hf://"):
        return _hf_repo(uri)
    loc = resolve(uri, settings)
    if loc.scheme == "file":
        return loc.path
    return _download_once(loc)


def _download_once(loc: Location) -> str:
    files = list_files(loc)
    if not files:
        raise BadInputError(f"model {loc.uri} holds no files")
    # The key covers the listing (names, sizes, mtimes): a model overwritten in place is
    # downloaded again instead of served stale from the cache.
    infos = loc.filesystem.get_file_info(files)
    digest = hashlib.sha256(loc.uri.encode())
    for i in infos:
        digest.update(f"{i.path}:{i.size}:{i.mtime_ns}".encode())
    root = os.path.join(cache_root(), "models")
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, digest.hexdigest()[:24])
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers of this node wait here
        if os.path.exists(os.path.join(target, ".complete")):
            return target
        partial = target + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        pafs.copy_files(loc.path, partial, source_filesystem=loc.filesystem,
                        destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        open(os.path.join(partial, ".complete"), "w").close()
        shutil.rmtree(target, ignore_errors=True)
        os.rename(partial, target)
    return target


def load_tokenizer(path: str, revision: str | None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision or None, token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:
        _bad_local_model("tokenizer", path, exc)
        raise
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, revision: str | None, dtype, **extra):
    """`extra`: more from_pretrained arguments (QLoRA's quantization_config and device_map)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, revision=revision or None, dtype=dtype,
                                                    token=os.environ.get("HF_TOKEN") or None, **extra)
    except Exception as exc:
        _bad_local_model("model", path, exc)
        raise


def _bad_local_model(what: str, path: str, exc: BaseException) -> None:
    """Raise BadInputError when a model read from local files (file://, or downloaded whole
    from S3) fails to load: the files are what they are, a retry cannot fix them. A Hub
    repo id (network errors) keeps its own exception."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return  # the node's memory, not the files
    if os.path.isdir(path):
        from .storage import describe

        raise BadInputError(f"cannot load the {what} from {path}: {describe(exc)}") from None
