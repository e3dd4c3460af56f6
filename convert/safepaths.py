"""The converter reads only files inside the checkpoint (or adapter) folder it was given.

A downloaded checkpoint is untrusted: its shard index may name `../../.ssh/id_rsa` or `/etc/passwd`, and any
of its files may be a symlink to such a place; whatever the converter reads ends up inside the GGUF file the
user then shares. Names from index files must be plain relative paths, and every file, after resolving
symlinks, must lie inside the folder. The one exception is the Hugging Face cache layout, where
`snapshots/<rev>/*` are symlinks into the repository's `blobs/` folder.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from llmrun.errors import ConvertError


def _roots(folder: Path) -> list[Path]:
    folder = Path(folder)
    roots = [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":     # huggingface_hub cache: models--x/snapshots/<rev>/
        roots.append(folder.resolve().parent.parent / "blobs")
    return roots


def inside(path: Path, folder: Path) -> Path:
    """`path` if it (symlinks resolved) lies inside `folder`; else a ConvertError naming both."""
    real = Path(path).resolve()
    for root in _roots(folder):
        if real == root or root in real.parents:
            return Path(path)
    raise ConvertError(f"{path}: resolves to {real}, outside {folder}; refusing to read it")


def child(folder: Path, name, what: str) -> Path:
    """A file name found in an index inside `folder`: relative, without '..', and inside `folder`."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ConvertError(f"{folder}: {what} {name!r:.80} is not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise ConvertError(f"{folder}: {what} {name!r:.80} points outside the folder; refusing to read it")
    return inside(Path(folder) / name, folder)
