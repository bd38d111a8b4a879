"""Where CLIP weights come from, and what names them in records and feature-cache keys.

``backbone.model`` may carry open_clip's schemas: ``hf-hub:org/repo`` (optionally ``@<revision>``: a
branch, tag or commit) or ``local-dir:/path`` (a folder with ``open_clip_config.json`` and a
checkpoint); open_clip then takes the config and the weights from there and ignores
``backbone.pretrained``. promptdg resolves an ``hf-hub:`` model to its snapshot in the Hugging Face
cache first (downloading it when the hub can be reached) and loads that folder as ``local-dir:``,
so the weights are named by repository and commit (``hf-hub:org/repo@<commit>/<file>``) wherever a
run is recorded or a feature cached, and a moved branch gives new cache keys, never stale features.

Reaching the hub goes through ``huggingface_hub`` alone: its offline mode (``HF_HUB_OFFLINE``, or
``TRANSFORMERS_OFFLINE``), its endpoint (``HF_ENDPOINT``) and its HTTP client, which honours the
proxy variables; one request without retries tells whether the endpoint answers, so a machine
without network gets a clear message in seconds instead of the client's retries with back-off.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .errors import WeightsNotFound

log = logging.getLogger("promptdg")
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
CONFIG_NAME = "open_clip_config.json"
# open_clip's names for a hub repository's weights, in its order of preference (open_clip/constants.py)
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")


def has_schema(model_name: str) -> bool:
    return str(model_name).startswith((HF_HUB, LOCAL_DIR))


def hub_unavailable(timeout: float = 5.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be used here (None: it answered)."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # (the client's proxies and certificates)
    except Exception as e:  # no network, a proxy that refuses, DNS
        return f"{constants.ENDPOINT} (HF_ENDPOINT) cannot be reached: {type(e).__name__}: {e}"
    return None


def file_weights(kind: str, path: Path, **extra) -> Dict[str, Any]:
    """A checkpoint file named by where it is, its size and modification time."""
    st = path.stat()
    ident = f"{kind}:{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return {"kind": kind, "id": ident, "path": str(path.resolve()), "file": path.name, "size": st.st_size, **extra}


def hub_revision(path: Path) -> Tuple[Optional[str], Optional[str]]:
    """(repo, commit) of a file or folder inside the Hugging Face cache (``models--org--repo/snapshots/<commit>``)."""
    parts = Path(os.path.abspath(path)).parts  # (not resolved: a snapshot's files are links to blobs)
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i][len("models--"):].replace("--", "/"), parts[i + 2]
    return None, None


# --------------------------------------------------------------------- hf-hub: and local-dir:
def resolve_schema(model_name: str, cache_dir: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(the name open_clip loads: ``local-dir:<folder>``, the weights' description) for a model named
    with a schema; raises :class:`WeightsNotFound` with what to do."""
    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR):]).expanduser()
        return f"{LOCAL_DIR}{folder}", local_dir_weights(folder, model_name)
    repo, _, revision = model_name[len(HF_HUB):].partition("@")
    folder, files = _hub_snapshot(repo, revision or None, cache_dir)
    weights = next((folder / n for n in HUB_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise WeightsNotFound(
            f"backbone.model={model_name!r}: {repo} at {folder.name} holds no weights ({', '.join(HUB_WEIGHTS)}); "
            f"files there: {', '.join(files) or '(none)'}"
        )
    commit = folder.name
    return f"{LOCAL_DIR}{folder}", {"kind": "hf-hub", "id": f"hf-hub:{repo}@{commit}/{weights.name}", "repo": repo,
                                    "revision": commit, "requested_revision": revision or "main", "file": weights.name}


def local_dir_weights(folder: Path, model_name: str) -> Dict[str, Any]:
    from open_clip.factory import _find_checkpoint_in_dir  # the file open_clip itself loads from the folder

    config = folder / CONFIG_NAME
    if not config.is_file():
        raise WeightsNotFound(f"backbone.model={model_name!r}: no {CONFIG_NAME} in {folder} (a local-dir: folder holds "
                              f"open_clip's config and a checkpoint, as a hub repository of open_clip does)")
    checkpoint = _find_checkpoint_in_dir(folder)
    if checkpoint is None:
        raise WeightsNotFound(
            f"backbone.model={model_name!r}: {folder} has {CONFIG_NAME} but no checkpoint (*.safetensors, *.bin, *.pth)"
        )
    repo, commit = hub_revision(folder)
    out = file_weights("local-dir", Path(checkpoint), config_sha256=hashlib.sha256(config.read_bytes()).hexdigest())
    out["path"] = str(folder.resolve())
    if repo:  # a snapshot folder of the Hugging Face cache: its repository and commit say more than a path
        out.update(repo=repo, revision=commit)
    return out


def _hub_snapshot(repo: str, revision: Optional[str], cache_dir: Optional[str]) -> Tuple[Path, list]:
    """The cached snapshot folder of ``repo`` at ``revision`` (None: main) holding the config and the
    weights, downloaded first when missing and the hub can be reached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    def cached(name: str) -> Optional[Path]:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision)
        return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None

    config = cached(CONFIG_NAME)
    if config is not None and any(cached(n) for n in HUB_WEIGHTS):
        return config.parent, sorted(p.name for p in config.parent.iterdir())
    where = cache_dir or os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
    why = hub_unavailable()
    if why:
        raise WeightsNotFound(
            f"backbone.model=hf-hub:{repo}{'@' + revision if revision else ''}: not in the Hugging Face cache "
            f"({where}) and {why}. "
            f"On a machine with network: `huggingface-cli download {repo} {CONFIG_NAME} {HUB_WEIGHTS[0]}"
            f"{' --revision ' + revision if revision else ''}` (HF_HUB_CACHE={where}), "
            f"or copy the repository's files into a folder and use backbone.model=local-dir:/that/folder."
        )
    try:
        config = Path(hf_hub_download(repo, CONFIG_NAME, revision=revision, cache_dir=cache_dir))
        for name in HUB_WEIGHTS:
            try:
                hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir)
                break
            except Exception:  # (the repository has another of the names)
                continue
    except Exception as e:  # a missing repository, a gated one, a network error
        raise WeightsNotFound(f"backbone.model=hf-hub:{repo}: downloading it failed ({type(e).__name__}: {e})") from e
    return config.parent, sorted(p.name for p in config.parent.iterdir())
