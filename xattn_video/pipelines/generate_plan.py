"""What a ``generate`` run makes and where: the prompts, one job per (variant, prompt, seed, k) with a fingerprint
of the settings that shape its video, the share of the jobs of each process (RANK / WORLD_SIZE), the output
layout, whether a job's video is already made, and the JSONL manifest."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .generate_config import MAX_NAME_BYTES, ConfigError, GenerateConfig, Variant

# ------------------------------------------------------------------------------------------------- prompts


def read_prompt_file(path: str | os.PathLike, key: str = "prompts.file") -> list[str]:
    """A prompt file: one prompt a line; blank lines and lines starting with ``#`` are skipped. A file that
    cannot be read or is not UTF-8 is a one-line ConfigError naming ``key``."""
    from .preflight import read_text_file

    lines = read_text_file(path, key).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_vbench_prompts(path: str | os.PathLike) -> list[str]:
    """VBench prompts in order, stripped as VBench strips them: a .txt (one a line, as VBench's prompts/*.txt)
    or VBench_full_info.json (a list of {"prompt_en": ...}). Repeats are dropped: VBench names videos by
    prompt, so a repeated prompt would be the same files."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".json":
        from .preflight import read_text_file

        try:
            data = json.loads(read_text_file(path, "prompts.vbench_file"))
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"prompts.vbench_file = {str(path)!r} is not allowed: not valid JSON ({e})") from None
        if not isinstance(data, list) or not all(isinstance(d, dict) and "prompt_en" in d for d in data):
            raise ConfigError(f"prompts.vbench_file = {str(path)!r} is not allowed: a VBench json is a list of "
                              '{"prompt_en": ...} entries')
        prompts = [str(d["prompt_en"]).strip() for d in data]
    else:
        prompts = read_prompt_file(path, "prompts.vbench_file")  # VBench's own files hold no blank or "#" lines
    return list(dict.fromkeys(prompts))


def resolve_prompts(cfg: GenerateConfig) -> list[str]:
    """The run's prompts from the one source in use: vbench_file, else file, else the inline list."""
    if cfg.prompts.vbench_file is not None:
        prompts, key = read_vbench_prompts(cfg.prompts.vbench_file), "prompts.vbench_file"
    elif cfg.prompts.file is not None:
        prompts, key = read_prompt_file(cfg.prompts.file), "prompts.file"
    else:
        prompts, key = list(cfg.prompts.list), "prompts.list"
    if not prompts:
        value = cfg.prompts.vbench_file or cfg.prompts.file or []
        raise ConfigError(f"{key} = {value!r} is not allowed: it holds no prompt")
    return prompts


# ---------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class VideoJob:
    """One video to make: a prompt, a seed, the k-th video of that seed, under one attention variant.

    index: the video's number among its prompt's videos (seed position x videos_per_prompt + k), VBench's
    ``{prompt}-{index}``. key: a fingerprint of every setting that shapes the file; resume skips a video only
    when its sidecar carries the same key.
    """

    variant: Variant
    prompt_index: int
    prompt: str
    seed: int
    k: int
    index: int
    name: str
    key: str

    @property
    def label(self) -> str:
        return f"{self.variant.name}/{self.name}"


def slugify(text: str, max_len: int = 48) -> str:
    """A short file-name-safe form of a prompt: lower case, runs of other characters become one dash."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "prompt"


def _fingerprint(cfg: GenerateConfig, variant: Variant, prompt: str, seed: int, k: int) -> str:
    # keys added later count only when set, so videos made before they existed keep their fingerprints
    later = {"model": ("vae_dtype",), "video": ("guidance_scale_2", "flow_shift", "image")}
    model = {k_: getattr(cfg.model, k_) for k_ in ("id", "revision", "dtype", "transformer_dtype", "vae_dtype")}
    shape = {
        "model": {k_: x for k_, x in model.items() if not (k_ in later["model"] and x is None)},
        "video": {k_: x for k_, x in cfg.video.__dict__.items() if not (k_ in later["video"] and x is None)},
        "attention": variant.settings(),
        "prompt": prompt,
        "seed": seed,
        "k": k,
        "videos_per_prompt": cfg.videos_per_prompt,
        "crf": cfg.output.crf,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:20]


def plan_jobs(cfg: GenerateConfig, prompts: Sequence[str]) -> list[VideoJob]:
    """Every video of the run in a fixed order (prompt, seed, k, variant), so that every process computes
    the same list, and the dense and XAttention versions of one video come out close together.

    Raises ConfigError when two videos of a variant would get the same file name, or a name is unusable.
    """
    jobs: list[VideoJob] = []
    seen: dict[tuple[str, str], VideoJob] = {}
    key_path = "prompts.vbench_file" if cfg.vbench else "output.naming"
    for p_idx, prompt in enumerate(prompts):
        for s_pos, seed in enumerate(cfg.seeds):
            for k in range(cfg.videos_per_prompt):
                index = s_pos * cfg.videos_per_prompt + k
                name = cfg.output.naming.format(
                    prompt=prompt, slug=slugify(prompt), prompt_index=p_idx, seed=seed, k=k, index=index
                )
                if "/" in name or "\0" in name or name.startswith(".") or not name.strip():
                    raise ConfigError(f"{key_path}: prompt {p_idx} ({prompt!r}) gives the file name {name!r}, which "
                                      "is not allowed: no '/' and no leading '.'")
                if len(name.encode()) > MAX_NAME_BYTES:
                    raise ConfigError(f"{key_path}: prompt {p_idx} gives a file name of {len(name.encode())} bytes; "
                                      f"at most {MAX_NAME_BYTES} are allowed (use {{slug}} instead of {{prompt}})")
                for variant in cfg.variants:
                    job = VideoJob(variant, p_idx, prompt, seed, k, index, name,
                                   _fingerprint(cfg, variant, prompt, seed, k))
                    twin = seen.get((variant.name, name))
                    if twin is not None:
                        raise ConfigError(
                            f"{key_path} = {cfg.output.naming!r} is not allowed: it names two videos {name!r} "
                            f"(prompt {twin.prompt_index} seed {twin.seed} k {twin.k} and prompt {p_idx} seed {seed} "
                            f"k {k}); use fields that tell them apart: {{prompt_index}}, {{seed}}, {{k}} or {{index}}"
                        )
                    seen[(variant.name, name)] = job
                    jobs.append(job)
    return jobs


def shard(jobs: Sequence[VideoJob], rank: int, world_size: int) -> list[VideoJob]:
    """This process's share: every world_size-th video from its rank, each with all its attention variants,
    so that the dense and XAttention versions of one video are made on the same GPU and their times compare.
    The shares are disjoint and together hold every job, whatever the job count."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    videos = list(dict.fromkeys((job.prompt_index, job.seed, job.k) for job in jobs))
    mine = set(videos[rank::world_size])
    return [job for job in jobs if (job.prompt_index, job.seed, job.k) in mine]


def dist_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the arguments, else from torchrun / accelerate's environment."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    r = rank if rank is not None else int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(r if world_size is not None else 0)))
    if world < 1 or not 0 <= r < world:
        raise ConfigError(f"rank {r} of world size {world} is not allowed: need 0 <= rank < world_size")
    return r, world, local


# -------------------------------------------------------------------------------------------------- layout


class Layout:
    """Where a run's files live under output.root (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.partial = self.root / ".partial"
        self.manifest = self.root / "manifest.jsonl"
        self.config = self.root / "config.yaml"

    def video(self, job: VideoJob) -> Path:
        return self.root / job.variant.name / f"{job.name}.mp4"

    def sidecar(self, job: VideoJob) -> Path:
        return self.root / "meta" / job.variant.name / f"{job.name}.json"

    def latents(self, job: VideoJob) -> Path:
        return self.root / "meta" / job.variant.name / f"{job.name}.latents.pt"

    def lock(self, job: VideoJob) -> Path:
        """The lock file a process holds while it makes the job's video in every variant (a hash of the name:
        names can be long)."""
        tag = hashlib.sha1(job.name.encode()).hexdigest()[:16]
        return self.partial / "locks" / f"{tag}.lock"

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))


def read_sidecar(path: Path) -> dict | None:
    """The sidecar's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def job_state(job: VideoJob, layout: Layout, keep_latents: bool) -> str:
    """'done' (files there, same settings), 'stale' (made with other settings) or 'todo'."""
    sidecar = read_sidecar(layout.sidecar(job))
    if sidecar is None or not layout.video(job).is_file():
        return "todo"
    if sidecar.get("key") != job.key:
        return "stale"
    if keep_latents and not layout.latents(job).is_file():
        return "todo"
    return "done"


def append_manifest(path: Path, record: dict) -> None:
    """Append one JSON line with a single O_APPEND write, so that concurrent processes never interleave.

    A line that an earlier writer left cut short (killed, disk full) is ended first, so that it never swallows
    this record; a write that the disk cuts short raises OSError (ENOSPC) instead of passing silently.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes of a record could be appended", str(path))
    finally:
        os.close(fd)
