"""Hugging Face checkpoint directories: find them (local or Hub cache), check them, read their files,
and publish an export (in place, or uploaded to object storage) so that a half-written one never looks
complete.

Only safetensors are read (no pickle).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Any

from jsft.interop.hf_config import UnsupportedCheckpoint, config_from_hf

# The tokenizer files of a checkpoint (read from a Hub repository, copied into an export).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# What jsft reads from a Hub repository: the model config, safetensors weights and the tokenizer.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model*.safetensors",
    *TOKENIZER_FILES,
    "additional_chat_templates/*.jinja",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_cache() -> str:
    """The Hub cache directory as huggingface_hub computes it, from the environment of this moment."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return os.path.expanduser(cache or os.path.join(home, "hub"))


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((f or "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def resolve_path(path_or_id: str, key: str = "config.model.hf_path") -> str:
    """A local checkpoint directory for `path_or_id`: a local directory as it is, or a Hugging Face
    Hub id (`owner/name`) as its snapshot in the Hub cache, downloaded first unless HF_HUB_OFFLINE is
    set (config, tokenizer and safetensors files only)."""
    if not path_or_id or os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r} is a file; point it at a Hugging Face model directory or Hub id"
        )
    if not _HUB_ID.fullmatch(path_or_id):
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r}: no such directory (nor a Hugging Face Hub id such as 'Qwen/Qwen3-0.6B')"
        )
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache, offline = _hub_cache(), _offline()
    try:
        return snapshot_download(
            path_or_id, cache_dir=cache, local_files_only=offline, allow_patterns=HUB_FILES
        )
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows partial snapshots
            raise UnsupportedCheckpoint(
                f"{key}={path_or_id!r}: its snapshot in the Hugging Face cache ({cache}) is incomplete; "
                f"finish the download with `hf download {path_or_id}` while online"
            ) from e
        cause = e.__cause__ or e
        reason = (
            "HF_HUB_OFFLINE is set; download it first with `hf download {id}` (or point HF_HOME at a "
            "cache that has it) or set HF_HUB_OFFLINE=0"
            if offline
            else f"the Hub could not be reached ({type(cause).__name__}: {str(cause).splitlines()[0]}); "
            "check the network, or download it elsewhere with `hf download {id}` and copy the cache"
        )
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r} is not a local directory and is not in the Hugging Face cache "
            f"({cache}, from HF_HOME or HF_HUB_CACHE), and " + reason.format(id=path_or_id)
        ) from e
    except RepositoryNotFoundError as e:
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r}: no such model on the Hugging Face Hub, or it is private or gated "
            "(accept its terms on the model page and log in with `hf auth login`)"
        ) from e
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedCheckpoint(
            f"{key}={path_or_id!r}: the Hugging Face Hub refused ({first_line})"
        ) from e


def check_directory(path: str, weights: bool = True, key: str = "config.model.hf_path") -> None:
    """Refuse a checkpoint directory jsft cannot load, before any data is read: no config.json, an
    unsupported architecture, or (with `weights`) no safetensors weights. Reads config.json and the
    safetensors index only."""
    where = f"{key}={path!r}"
    if not os.path.isdir(path):
        raise UnsupportedCheckpoint(f"{where}: no such directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UnsupportedCheckpoint(
            f"{where}: no config.json there; point it at a Hugging Face model directory "
            "(config.json and *.safetensors, as save_pretrained writes them)"
        )
    try:
        with open(config_path) as f:
            config_from_hf(json.load(f))
    except UnsupportedCheckpoint as e:
        raise UnsupportedCheckpoint(f"{where}: {e}") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UnsupportedCheckpoint(f"{where}: config.json is not a model config ({e!r})") from e
    if not weights:
        return
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise UnsupportedCheckpoint(
                f"{where}: model.safetensors.index.json names shards that are not there: {missing[:4]}; "
                "download the checkpoint again"
            )
        return
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return
    pickles = sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
    )
    if pickles:
        raise UnsupportedCheckpoint(
            f"{where} holds only pickle weights ({', '.join(pickles[:3])}); jsft reads safetensors "
            "only, since unpickling can run arbitrary code. Convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise UnsupportedCheckpoint(
        f"{where}: no weights (model.safetensors or model.safetensors.index.json) in the directory"
    )


def weight_files(directory: str) -> dict[str, str]:
    """HF tensor name -> safetensors file; pickle-only checkpoints are refused."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(single, "numpy") as f:
            return dict.fromkeys(f.keys(), single)
    if glob.glob(os.path.join(directory, "*.bin")) or glob.glob(os.path.join(directory, "*.pt")):
        raise UnsupportedCheckpoint(
            f"{directory} holds only pickle weights (*.bin/*.pt); jsft reads safetensors only, since "
            "unpickling can run arbitrary code. Convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def read_config(directory: str) -> dict:
    """The checkpoint's config.json as a dict."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {directory} (config.model.hf_path)")
    with open(path) as f:
        return json.load(f)


def source_fields(directory: str) -> tuple[dict, dict | None]:
    """What an export carries over from the HF checkpoint a model was fine-tuned from: config.json's
    special ids and `max_position_embeddings` (those it sets), and generation_config.json if any."""
    source = read_config(directory)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
    fields = {k: source[k] for k in keys if source.get(k) is not None}
    path = os.path.join(directory, "generation_config.json")
    generation = None
    if os.path.exists(path):
        with open(path) as f:
            generation = json.load(f)
    return fields, generation


# --------------------------------------------------------------------------- writing an export

# Weight files an export replaces: transformers prefers a lone model.safetensors over an index, so a
# stale one left beside a new index would silently win.
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def staging_dir(out_dir: str) -> str:
    """An empty directory beside `out_dir` (same filesystem, so `publish` can rename) to write into."""
    out_dir = os.path.abspath(out_dir)
    staging = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")
    if os.path.exists(staging):  # left by an export that crashed
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def publish(staging: str, out_dir: str) -> None:
    """Move a finished export from `staging` to `out_dir`, atomically when `out_dir` is new or empty.

    Into a directory that holds files (a previous export), its config.json goes first and comes back
    last, and its old weight files are removed: until the move completes, the directory does not look
    like a loadable model, and never mixes two exports' weights.
    """
    out_dir = os.path.abspath(out_dir)
    try:
        os.rename(staging, out_dir)  # replaces an empty directory too
        return
    except OSError:
        if not os.path.isdir(out_dir):
            raise
    old = [n for n in os.listdir(out_dir) if _is_model_file(n)]
    for name in sorted(old, key=lambda n: n != "config.json"):
        os.remove(os.path.join(out_dir, name))
    for name in sorted(os.listdir(staging), key=lambda n: n == "config.json"):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def upload(local_dir: str, remote_dir: str) -> None:
    """Copy a finished export to object storage (`gs://...` through gcsfs; any fsspec URL), the way
    `publish` moves it: a previous export's config.json goes first, then its weight files, and the new
    config.json lands last, so the destination never looks like a model with mixed or missing weights.
    """
    import fsspec  # noqa: PLC0415 - only exports to object storage need it

    fs, root = fsspec.core.url_to_fs(remote_dir)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    if fs.isdir(root):
        old = [p for p in fs.ls(root, detail=False) if _is_model_file(p.rstrip("/").rsplit("/", 1)[-1])]
        for path in sorted(old, key=lambda p: not p.endswith("/config.json")):
            fs.rm(path)
    for name in sorted(os.listdir(local_dir), key=lambda n: n == "config.json"):
        source = os.path.join(local_dir, name)
        if os.path.isdir(source):
            fs.put(source + "/", f"{root}/{name}/", recursive=True)
        else:
            fs.put_file(source, f"{root}/{name}")


def _is_model_file(name: str) -> bool:
    return name == "config.json" or bool(_WEIGHT_FILE.fullmatch(name))


def copy_tokenizer_files(tokenizer_dir: str, out_dir: str) -> list[str]:
    """Copy a checkpoint's tokenizer files (and extra chat templates) into an export; returns them."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    extra = os.path.join(tokenizer_dir, "additional_chat_templates")
    if os.path.isdir(extra):
        shutil.copytree(extra, os.path.join(out_dir, "additional_chat_templates"), dirs_exist_ok=True)
        copied.append("additional_chat_templates")
    return copied


def write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
