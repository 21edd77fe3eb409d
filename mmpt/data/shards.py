"""Shard URL handling: expand patterns, fail early on missing local shards, split across ranks/workers.

A shard spec is what a user types in a config: a path, a brace pattern (`/d/{00000..00099}.tar`),
several patterns joined by `::`, a list of any of those, a `pipe:` command, or a remote URL.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

ShardSpec = str | os.PathLike | Sequence[str]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHOW_MISSING = 5  # missing shards named in the error; the rest are only counted


def expand_urls(urls: ShardSpec) -> list[str]:
    """Every shard URL in `urls`, in order (duplicates kept: repeating a shard is a way to upweight it).

    `::` splits a string into patterns and each pattern is brace-expanded; a list is expanded item by
    item, so list items may themselves hold `::` or braces. `~` is expanded for local paths only.
    """
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    if isinstance(urls, str):
        parts = urls.split("::")
    elif isinstance(urls, Sequence):
        return [url for item in urls for url in expand_urls(str(item))]
    else:
        raise TypeError(f"shard spec must be a string or a list of strings, got {type(urls).__name__}")
    out: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        for url in braceexpand.braceexpand(part):
            out.append(os.path.expanduser(url) if is_local(url) else url)
    return out


def is_local(url: str) -> bool:
    """A file on this machine: a plain path or a `file:` URL (not `pipe:`, not `scheme://...`)."""
    if url.startswith("pipe:"):
        return False
    if url.startswith("file:"):
        return True
    return _SCHEME.match(url) is None


def local_path(url: str) -> str:
    """The filesystem path behind a local URL (strips `file:` the way webdataset's gopen does)."""
    if url.startswith("file:"):
        return url2pathname(urlparse(url).path)
    return url


def _describe(spec: ShardSpec) -> str:
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
    else:
        text = " :: ".join(map(str, spec))
    return repr(text if len(text) <= 200 else text[:197] + "...")


def check_local_shards(urls: ShardSpec) -> None:
    """Raise one readable `FileNotFoundError` before any worker starts if local shards are missing.

    Without this, a typo in a shard path surfaces as a warning per worker (or an endless resampling
    loop) deep inside the DataLoader. `pipe:` and remote URLs cannot be checked cheaply and are skipped.
    """
    expanded = expand_urls(urls)
    fix = (
        "write shards with `mmpt-data synthetic --out DIR` (or your own WebDataset tars) "
        "and point the pattern at them"
    )
    if not expanded:
        raise FileNotFoundError(
            f"shard pattern {_describe(urls)} expands to no shards; give a path, a brace pattern like "
            f"'/data/{{00000..00099}}.tar', '::'-joined patterns or a list; or {fix}"
        )
    missing = [u for u in expanded if is_local(u) and not os.path.isfile(local_path(u))]
    if not missing:
        return
    shown = ", ".join(missing[:_SHOW_MISSING])
    more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    raise FileNotFoundError(
        f"{len(missing)} of {len(expanded)} shard(s) from pattern {_describe(urls)} do not exist: {shown}{more}. "
        f"Check the path and the brace range, or {fix}"
    )


def split_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This (rank, worker)'s disjoint slice: by node first, then by worker, so the union is `urls` once.

    May be empty when there are fewer shards than ranks * workers; callers must then yield nothing.
    """
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad split: rank {rank} of {world_size}, worker {worker} of {num_workers}")
    return urls[rank::world_size][worker::num_workers]
