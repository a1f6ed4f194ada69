"""Where local data set files are looked for, and the error when they are not there.

Nothing is ever downloaded.  A data set that is not embedded is read from
the first of these folders that holds any of its files:

1. ``<root>/<subfolder>`` for the ``root`` argument (``--data-root`` on the
   command lines);
2. ``<$LINF_DATA_ROOT>/<subfolder>``;
3. a system folder where a package manager installs it (Fashion-MNIST:
   Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``).

The subfolders are torchvision's (``MNIST/raw``, ``FashionMNIST/raw``,
``cifar-10-batches-py``), so a root torchvision filled once works as it is.
A folder that holds some of a data set's files but not all is an error
naming the missing ones (it is not skipped), so half-copied data never
falls back silently to another copy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["DATA_ROOT_ENV", "DataNotFoundError", "candidate_folders", "find_files"]

DATA_ROOT_ENV = "LINF_DATA_ROOT"


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing; the message names the folders searched and how to get the files."""


@dataclass(frozen=True)
class _Candidate:
    folder: Path
    why: str  # "root=", "$LINF_DATA_ROOT", "system"


def candidate_folders(subfolder: str, root: Optional[str] = None, system: Optional[Path] = None) -> List[_Candidate]:
    """The folders searched, in order (see the module docstring)."""
    out = []
    if root:
        out.append(_Candidate(Path(root).expanduser() / subfolder, "root"))
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        out.append(_Candidate(Path(env).expanduser() / subfolder, f"${DATA_ROOT_ENV}"))
    if system is not None:
        out.append(_Candidate(Path(system), "system"))
    return out


def _present(folder: Path, name: str, suffixes: Sequence[str]) -> Optional[Path]:
    for suffix in suffixes:
        path = folder / (name + suffix)
        if path.is_file():
            return path
    return None


def find_files(dataset: str, names: Sequence[str], all_names: Sequence[str], candidates: Sequence[_Candidate],
               how_to_get: str, suffixes: Sequence[str] = ("",)) -> Dict[str, Path]:
    """The paths of ``names`` in the first candidate folder holding any of ``all_names``.

    Args:
        dataset: the data set's name, for messages.
        names: the files needed now (one split's).
        all_names: every file of the data set (a folder holding any of them is the data set's folder).
        candidates: from :func:`candidate_folders`, in search order.
        how_to_get: the sentence telling the user how to install the files.
        suffixes: accepted endings of each name (``("", ".gz")`` for IDX files).

    Returns:
        ``{name: path}`` for every name in ``names``.

    Raises:
        DataNotFoundError: no folder holds the data set (every folder searched
            is named), or the first one that does lacks some of ``names``.
    """
    for cand in candidates:
        if not any(_present(cand.folder, n, suffixes) for n in all_names):
            continue
        found = {n: _present(cand.folder, n, suffixes) for n in names}
        missing = [n for n, p in found.items() if p is None]
        if missing:
            alts = " or ".join(repr(s) for s in suffixes if s) if any(suffixes) else ""
            raise DataNotFoundError(
                f"{dataset}: {cand.folder} holds some of its files but not {missing}"
                + (f" (each may also end in {alts})" if alts else "") + f". Expected there: {list(all_names)}. "
                + how_to_get)
        return found  # type: ignore[return-value]
    if not candidates:
        raise DataNotFoundError(
            f"{dataset}: no data root given: pass root=... (--data-root on the command line) or set "
            f"{DATA_ROOT_ENV}; linf_plugin never downloads data. {how_to_get}")
    searched = "; ".join(f"{c.folder} ({'root=' if c.why == 'root' else c.why})" for c in candidates)
    raise DataNotFoundError(f"{dataset}: its files {list(all_names)} are in none of the folders searched: "
                            f"{searched}. {how_to_get}")
