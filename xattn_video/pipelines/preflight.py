"""Checks every job makes before any work, each failing with one line that says what was looked for, where,
and what to do: output folders that cannot be written, input text files that cannot be read, models that
cannot be found (a hub that cannot be reached, a local folder that is not a model), a full-size model about to
load onto a machine without a GPU, and an attention backend the device cannot run.

The model check never waits on the hub's retries: a local path is checked on disk only, ``HF_HUB_OFFLINE=1``
checks the local cache only, and otherwise one short request tells a reachable hub from an unreachable one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .config_checks import ConfigError

HUB_PROBE_TIMEOUT_S = 10.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------- output paths


def check_output_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a folder this process can write in, or ConfigError. Nothing is created: when the folder
    does not exist yet, its nearest existing parent must be a folder that can be written (a probe file is
    created there and removed)."""
    folder = Path(path).expanduser()
    probe_in = folder
    while not probe_in.exists():
        if probe_in.is_symlink():  # a dangling link
            raise ConfigError(f"{key} = {str(path)!r} is not allowed: {str(probe_in)!r} is a broken symbolic link")
        parent = probe_in.parent
        if parent == probe_in:
            break
        probe_in = parent
    if not probe_in.is_dir():
        where = "is a file" if probe_in == folder else f"cannot be created: {str(probe_in)!r} is a file"
        raise ConfigError(f"{key} = {str(path)!r} is not allowed: it {where}, not a folder")
    probe = probe_in / f".xattn-write-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        what = "it cannot be written" if probe_in == folder else f"it cannot be created in {str(probe_in)!r}"
        raise ConfigError(f"{key} = {str(path)!r} is not allowed: {what} ({e.strerror or e})") from None
    return folder


# ------------------------------------------------------------------------------------------------- inputs


def read_text_file(path: str | os.PathLike, key: str) -> str:
    """A UTF-8 text file's content, or ConfigError naming the key, the file and the first bad byte's line."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{key} = {str(path)!r} is not allowed: it cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{key} = {str(path)!r} is not allowed: it is not UTF-8 text (byte 0x{data[e.start]:02x} "
                          f"on line {line}); convert it, e.g. iconv -f latin1 -t utf-8") from None


# -------------------------------------------------------------------------------------------------- models


def looks_like_path(model_id: str) -> bool:
    """Whether ``model_id`` is meant as a local folder rather than a hub id ("org/name")."""
    return (model_id.startswith(("/", ".", "~")) or os.sep in model_id.replace("/", "", 1)
            or not _HUB_ID.match(model_id) or Path(model_id).expanduser().exists())


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _in_cache(model_id: str, revision: str | None, index_file: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, index_file, revision=revision)
    return isinstance(found, str)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_model_source(model_id: str, revision: str | None, *, key: str = "model.id",
                       index_file: str = "model_index.json", what: str = "a diffusers pipeline folder",
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Where ``model_id`` will load from, checked without waiting on the hub's retries; returns the extra
    ``from_pretrained`` keyword arguments (``local_files_only=True`` when only the cache can serve it).

    Raises ConfigError for a local folder without ``index_file``, a path that does not exist, a hub id that is
    neither reachable nor in the local cache (or not there in offline mode), and a repo the hub does not have.
    """
    hint = (f"give a local folder (model.id=/path/to/model, {what} with {index_file}), or fetch it where the hub "
            "can be reached and run with HF_HUB_OFFLINE=1 to use the cache only")
    if looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.exists():
            raise ConfigError(f"{key} = {model_id!r} is not allowed: no such folder (relative paths start at "
                              f"{os.getcwd()}); a hub id looks like org/name")
        if not folder.is_dir():
            raise ConfigError(f"{key} = {model_id!r} is not allowed: it is a file; give {what} holding {index_file}")
        if not (folder / index_file).is_file():
            raise ConfigError(f"{key} = {model_id!r} is not allowed: the folder has no {index_file}, so it is not "
                              f"{what} (e.g. the folder save_pretrained wrote, or a hub snapshot)")
        return {}
    cached = _in_cache(model_id, revision, index_file)
    if _offline():
        if cached:
            return {"local_files_only": True}
        raise ConfigError(f"{key} = {model_id!r} is not allowed: HF_HUB_OFFLINE is set and {index_file} of "
                          f"{model_id} (revision {revision or 'main'}) is not in the cache {_cache_dir()}; {hint}")
    reason = _hub_probe(model_id, revision)
    if reason is None:
        return {}
    if reason.startswith("missing:"):
        raise ConfigError(f"{key} = {model_id!r} is not allowed: {reason[len('missing:'):]}")
    if cached:
        if log is not None:
            log(f"the Hugging Face hub cannot be reached ({reason}): loading {model_id} from the cache "
                f"{_cache_dir()}")
        return {"local_files_only": True}
    raise ConfigError(f"{key} = {model_id!r} is not allowed: the Hugging Face hub cannot be reached ({reason}) and "
                      f"the model is not in the cache {_cache_dir()}; {hint}")


def _hub_probe(model_id: str, revision: str | None) -> str | None:
    """None when the hub answers for the repo; 'missing:<why>' when it says the repo or revision is not
    there; else why it cannot be reached (one line)."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    try:
        HfApi().model_info(model_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except hub_errors.GatedRepoError:
        return None  # it exists; from_pretrained says what the licence needs
    except hub_errors.RevisionNotFoundError:
        return f"missing:the hub has no revision {revision!r} of {model_id} (model.revision)"
    except hub_errors.RepositoryNotFoundError:
        return (f"missing:the hub has no repo {model_id} (or it is private: log in with `hf auth login`); "
                "a local folder must exist on disk")
    except hub_errors.HfHubHTTPError as e:
        return " ".join(str(e).split())[:200]
    except Exception as e:  # connection errors of the HTTP client in use
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


# -------------------------------------------------------------------------------------------------- device


CPU_AUTO_LIMIT_BYTES = 2 << 30  # a local model folder with less weight than this may run on the CPU by default
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def weights_bytes(model_id: str) -> int | None:
    """Total size of the weight files of a local model folder; None for a hub id (unknown without loading)."""
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def check_device_for_model(spec: str, device: str, model_id: str, key: str = "model.device") -> None:
    """A full-size model may load onto the CPU only when asked for by name: ``model.device = auto`` on a
    machine without CUDA would otherwise start moving tens of GB of weights into host memory. The tiny
    builtin model and local folders under :data:`CPU_AUTO_LIMIT_BYTES` of weights pass."""
    if spec != "auto" or device != "cpu" or model_id == "tiny" or model_id.startswith("tiny-"):
        return
    size = weights_bytes(model_id)
    if size is not None and size < CPU_AUTO_LIMIT_BYTES:
        return
    what = f"{size / 2**30:.1f} GiB of weights" if size is not None else "a hub model"
    raise ConfigError(f"{key} = 'auto' is not allowed here: no CUDA device is visible, and model.id = {model_id!r} "
                      f"is {what}, which would load onto the CPU (its whole size in host memory, and hours a "
                      f"video); set {key}=cpu to run it there anyway, or run on a machine with a GPU")


def check_backends_on_device(variants: Iterable[Any], device: str, key: str = "attention") -> None:
    """Every variant's attention backend can run on ``device`` (``triton`` needs CUDA, or TRITON_INTERPRET=1
    on the CPU), so that a bad pairing fails here and not on every video after the model loaded."""
    import torch

    from xattn_video.core.inputs import triton_usable

    for v in variants:
        if getattr(v, "mode", "xattn") == "xattn" and getattr(v, "backend", None) == "triton" and not triton_usable(
            torch.device(device)
        ):
            raise ConfigError(f"{key}.backend = 'triton' (variant {v.name}) is not allowed on {device}: the triton "
                              "backend needs a CUDA device; use auto (triton on CUDA, torch elsewhere), torch or flex")
        if getattr(v, "mode", "xattn") == "xattn" and getattr(v, "backend", None) == "fa4" and device == "cpu":
            raise ConfigError(f"{key}.backend = 'fa4' (variant {v.name}) is not allowed on cpu: FlashAttention-4 needs "
                              "a Hopper GPU; use auto, torch or flex")


__all__ = [
    "check_backends_on_device",
    "check_device_for_model",
    "check_model_source",
    "check_output_dir",
    "looks_like_path",
    "read_text_file",
    "weights_bytes",
]
