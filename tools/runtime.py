"""One run of a command: its output folder and ``config.json``, the device and precision, seeds,
how many processes load data, and the torchrun process group (through ``tools.distributed``).

Library code receives a :class:`Run` and typed parameters; only main.py and the scripts read
parsed command-line flags.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tools import distributed
from tools.errors import UserError
from tools.files import NOTICE, write_json

# Inference batch per process. On the CPU 16 is faster than 64 (tools.bench --batch-size 64 on a
# 2-core EPYC, bf16, 224 px: 49.5 against 37.7 img/s); a GPU wants larger batches to stay busy.
INFERENCE_BATCH = {"cpu": 16, "cuda": 64}


# ====== device, precision, seeds, cores ======

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX-512 BF16 or AMX) make bf16 autocast faster on the CPU."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA devices that support it and on CPUs with native bf16, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), else cpu_count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Loader processes: one per spare core, at most 8 (decoding is done once, by the cache)."""
    return min(8, max(0, available_cores() - 1))


def default_cache_dir() -> Path:
    """``$CXR_CACHE_DIR``, else ``$XDG_CACHE_HOME/cxr_suite``, else ``~/.cache/cxr_suite``."""
    if os.environ.get("CXR_CACHE_DIR"):
        return Path(os.environ["CXR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "cxr_suite"


# ====== the output folder and config.json ======

def prepare_outdir(outdir) -> Path:
    """Create ``outdir`` (parents too); a file in its place or no write permission is a user error."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"--outdir {outdir} is a file; pass a directory path")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=outdir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(f"--outdir {outdir} is not writable ({exc.strerror}); choose another directory") from None
    return outdir


@functools.cache  # config.json is rewritten as a run learns facts; the commit does not change
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "albumentations", "cv2", "numpy", "pandas", "sklearn", "pydicom"):
        module = sys.modules.get(name)
        if module is None:
            with contextlib.suppress(ImportError):
                module = __import__(name)
        versions[name] = getattr(module, "__version__", None)
    return versions


# ====== the run ======

@dataclass
class Run:
    """Where a command writes and how it computes. ``settings`` are the command's arguments as
    recorded in config.json; ``facts`` what the run learned (the checkpoint, skipped images)."""
    outdir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    seed: int = 1337
    batch_size: int | None = None    # None: INFERENCE_BATCH of the device (training has its own)
    num_workers: int | None = None   # None: spare cores to decode, none for passes on the CPU
    cache_dir: Path | None = None    # None: decoded pixels kept in memory only
    dicom_window: str = "file"       # how DICOM films are windowed (tools.dicom.WINDOW_MODES)
    skip_bad_images: bool = False
    compile: bool = False
    command: str | None = None
    settings: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    @property
    def workers(self) -> int:
        """Loader processes that decode files."""
        return default_workers() if self.num_workers is None else self.num_workers

    @property
    def pass_workers(self) -> int:
        """Loader processes for passes over decoded pixels, training's included: reading them
        costs microseconds, and a corruption or a training augmentation well under a millisecond
        (0.15 ms at 128 px, 0.34 ms at 224 px), so the CPU needs none: a worker only competes with
        the model for the cores, and is forked again every epoch (measured on 2 cores: a training
        epoch 12% slower with one). A GPU consumes images fast enough to want them."""
        if self.num_workers is not None:
            return self.num_workers
        return default_workers() if self.device.type == "cuda" else 0

    @property
    def inference_batch(self) -> int:
        return self.batch_size or INFERENCE_BATCH.get(self.device.type, INFERENCE_BATCH["cpu"])

    def stage(self, name: str) -> Run:
        """The same run, writing into ``<outdir>/<name>/`` (created on rank 0)."""
        sub = self.outdir / name
        if distributed.is_main():
            sub.mkdir(parents=True, exist_ok=True)
        return replace(self, outdir=sub)

    def config(self, **facts) -> None:
        """Write ``config.json`` (rank 0); called first, and again when facts are learned (each
        rewrite keeps the facts of the earlier ones)."""
        self.facts.update(facts)
        if not distributed.is_main():
            return
        config = {"command": self.command, "argv": sys.argv,
                  "args": {k: v for k, v in self.settings.items() if not k.startswith("_") and not callable(v)},
                  "versions": library_versions(), "platform": platform.platform(), "git_commit": git_commit(),
                  "note": NOTICE, "device": str(self.device), "precision": self.precision, "seed": self.seed,
                  "world_size": distributed.world_size(), "skipped_images": self.skipped, **self.facts}
        write_json(self.outdir / "config.json", config)


def start_run(outdir, device: str = "auto", precision: str = "auto", seed: int = 1337, cache_dir=None,
              no_cache: bool = False, **options) -> Run:
    """Output folder, seed, device (one per torchrun rank), precision, and config.json first.
    The decode cache is ``cache_dir``, else :func:`default_cache_dir`, or none with ``no_cache``;
    ``options``: the other :class:`Run` fields."""
    prepare_outdir(outdir)  # every rank: each may write there, and mkdir races are harmless
    resolved = resolve_device(distributed.init(device))
    seed_everything(seed)
    cache = None if no_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    run = Run(Path(outdir), resolved, resolve_precision(precision, resolved), seed, cache_dir=cache, **options)
    distributed.barrier()
    run.config()
    return run
