"""Training-checkpoint files on disk: written whole or not at all, listed in a manifest, read lazily.

Every file is written under a temporary name, flushed and renamed, so it is either whole or absent. The manifest
(`manifest.json`, written last) lists every file with its byte size; a load checks it first, so a truncated or
missing file fails naming itself before anything is read.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit this model; the message names the file or key."""


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(obj, path: str) -> int:
    """torch.save to a temporary name, flushed to disk, then renamed: the file is either whole or absent."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return os.path.getsize(path)


def write_text(text: str, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def commit_directory(partial: str, final: str, files: dict, tag: str, save_latest: bool) -> None:
    """Once every file of checkpoint `tag` is in `partial` (`files`: name -> byte size): write the manifest, rename
    `partial` to `final` (an older directory of the same tag is moved aside first and removed last), then replace
    `latest`. A crash at any point leaves the previous checkpoint and `latest` whole. Rank 0 only."""
    save_dir = os.path.dirname(final)
    manifest = dict(format=FORMAT_VERSION, tag=tag, files=files)
    write_text(json.dumps(manifest, indent=1, sort_keys=True), os.path.join(partial, MANIFEST))
    fsync_dir(partial)
    old = None
    if os.path.exists(final):
        old = os.path.join(save_dir, f".{tag}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(partial, final)
    if save_latest:
        write_text(tag, os.path.join(save_dir, LATEST))
    fsync_dir(save_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Reader:
    """Opens checkpoint files lazily (memory-mapped) and names the file in every failure."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._open: dict = {}

    def __call__(self, name: str):
        if name not in self._open:
            if name not in self.manifest["files"]:
                raise CheckpointError(f"checkpoint '{self.path}' has no file '{name}' (saved with another "
                                      "layout?)")
            full = os.path.join(self.path, name)
            try:
                self._open[name] = torch.load(full, map_location="cpu", mmap=True, weights_only=False)
            except Exception as err:
                raise CheckpointError(f"checkpoint file '{full}' cannot be read: {err}") from None
        return self._open[name]


def check_files(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory '{path}' does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint '{path}' has no '{MANIFEST}': incomplete or not an autotp checkpoint")
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint file '{manifest_path}' is damaged: {err}") from None
    for name, size in sorted(manifest["files"].items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint file '{full}' is missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(f"checkpoint file '{full}' is damaged: {actual} bytes, the manifest says {size}")
    return manifest


def resolve_tag(load_dir: str, tag: Optional[str]) -> Optional[str]:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest) as handle:
        return handle.read().strip()

