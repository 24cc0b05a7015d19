"""An offline text corpus: the Python standard library's own sources, split into train/validation by file.

Every machine with the same Python version has the same bytes (``sysconfig.get_paths()["stdlib"]``, no network), so
numbers measured on it are comparable once the version is recorded with them ([`corpus_version`]). Test packages
(folders named ``test``, ``tests``, ``idle_test``) and ``site-packages`` are left out. The split is by file, fixed by
a hash of the file's path relative to the library root: validation files are unseen in training, on any machine and
whatever else the folder holds. CPython 3.11.7: 734 files, 12.1 MB; 3.48M tokens with a 4,096-token byte-level BPE.
"""

import hashlib
import platform
import sysconfig
from pathlib import Path

import datasets


STDLIB_EXCLUDED_DIRS: frozenset[str] = frozenset({"test", "tests", "idle_test", "site-packages"})
SPLITS: tuple[str, str] = ("train", "validation")


def stdlib_root() -> Path:
    """The standard library's folder of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_version() -> str:
    """What identifies the corpus's bytes: ``"CPython 3.11.7 stdlib"`` (record it with any number measured on it)."""
    return f"{platform.python_implementation()} {platform.python_version()} stdlib"


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """The corpus's files: ``**/*.py`` under ``root`` outside test folders and ``site-packages``, as sorted relative
    POSIX paths."""
    root = Path(root or stdlib_root())
    files = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(p.as_posix() for p in files if not STDLIB_EXCLUDED_DIRS & set(p.parts[:-1]))


def split_of(relative_path: str, validation_fraction: float = 0.05) -> str:
    """``"validation"`` for a fixed ``validation_fraction`` of files, ``"train"`` otherwise.

    Decided by the SHA-256 of the relative path alone: the same on every machine and independent of the other files.
    """
    digest = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big")
    return "validation" if digest < validation_fraction * 2**64 else "train"


def load_stdlib_corpus(
    split: str, validation_fraction: float = 0.05, root: str | Path | None = None, max_samples: int | None = None
) -> datasets.Dataset:
    """One split of the standard-library corpus, one row per file.

    Args:
        split (`str`): ``train`` or ``validation``.
        validation_fraction (`float`, defaults to 0.05): fraction of files held out (by path hash, see [`split_of`]).
        root (`str` or `Path`, *optional*): the library folder; default: this interpreter's.
        max_samples (`int`, *optional*): keep the first ``max_samples`` files (in path order).

    Returns:
        [`datasets.Dataset`]: columns ``text`` (the file's source, UTF-8) and ``path`` (relative), sorted by path.

    Example:

    ```python
    >>> val = load_stdlib_corpus("validation")
    >>> val.column_names
    ['text', 'path']
    ```
    """
    if split not in SPLITS:
        raise ValueError(f"python_stdlib_local has splits {list(SPLITS)}, got {split!r}")
    root = Path(root or stdlib_root())
    paths = [p for p in stdlib_files(root) if split_of(p, validation_fraction) == split][:max_samples]
    texts = [(root / p).read_text(encoding="utf-8", errors="replace") for p in paths]
    return datasets.Dataset.from_dict({"text": texts, "path": paths})
