"""Every file the suite writes goes through here: atomically, so an interrupted run leaves the old
file or the new one, never half a file.

JSON is strict: NaN and infinities become ``null`` (SPEC: "an undefined metric is null").
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tools.errors import UserError

NOTICE = "Research and education only; not for clinical use."


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same suffix); rename it into place on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are meant to be shared
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def to_jsonable(obj):
    """numpy scalars/arrays to Python, non-finite floats to None, recursively."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        obj = float(obj)
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def write_csv(path, df) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig, path, dpi: int = 110) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_torch(obj, path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


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
    for name in ("torch", "torchvision", "albumentations", "cv2", "numpy", "pandas", "sklearn"):
        module = sys.modules.get(name)
        if module is None:
            with contextlib.suppress(ImportError):
                module = __import__(name)
        versions[name] = getattr(module, "__version__", None)
    return versions


def write_config(outdir, args, **extra) -> Path:
    """``config.json``: everything needed to rerun (arguments, versions, seed, device, commit)."""
    config = {
        "command": getattr(args, "command", None),
        "argv": sys.argv,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)},
        "versions": library_versions(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "note": NOTICE,
    }
    config.update(extra)
    return write_json(Path(outdir) / "config.json", config)
