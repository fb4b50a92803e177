"""Text input and atomic file output.

Every file actsparse writes goes through :func:`atomic_output`: it is written next to its final
path under a temporary name and renamed into place only once complete, so an error or Ctrl-C never
leaves a half-written calibration, thresholds or results file behind.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from .errors import ActsparseError

PACKAGED_TEXTS = {
    "wiki_calib": "wiki_calib.txt.gz",  # 52 Wikipedia articles, for calibration / training only
    "wiki_eval": "wiki_eval.txt.gz",  # the other 52 articles, for evaluation only
}


def read_text(path_or_name: str | os.PathLike) -> str:
    """Read a UTF-8 text file (``.txt`` or ``.txt.gz``) or a packaged text (``wiki_calib``, ``wiki_eval``)."""
    s = str(path_or_name)
    if s in PACKAGED_TEXTS:
        data = resources.files("actsparse").joinpath("data", PACKAGED_TEXTS[s]).read_bytes()
        return gzip.decompress(data).decode("utf-8")
    path = Path(s).expanduser()
    if not path.is_file():
        raise ActsparseError(f"text file not found: {s}")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise ActsparseError(f"cannot read text file {s}: {exc}") from exc
    if not text.strip():
        raise ActsparseError(f"text file {s} is empty")
    return text


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any long computation) if ``path`` cannot be written."""
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ActsparseError(f"output path {path} is a directory")
    if not parent.exists():
        raise ActsparseError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ActsparseError(f"output directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it into place only if the block succeeds."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_tensors(path, tensors: dict, meta: dict) -> None:
    """A safetensors file with our JSON metadata under the key ``actsparse``, written atomically."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"actsparse": json.dumps(meta)})


def load_tensors(path, kind: str) -> tuple[dict, dict]:
    """Read a file written by :func:`save_tensors`; its metadata must say ``kind``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ActsparseError(f"{kind} file not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["actsparse"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError) as exc:
        raise ActsparseError(f"corrupt or foreign {kind} file {path}: {exc}") from exc
    if meta.get("kind") != kind:
        raise ActsparseError(f"{path} is not an actsparse {kind} file (kind={meta.get('kind')})")
    return tensors, meta


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
