"""``metaxl data download``: MasakhaNER 2.0 and NusaX-Senti from their GitHub repositories.

Files are fetched from the corpora's public repositories at pinned commits, each checked against
a sha256 recorded in :mod:`metaxl.data_checksums`, and installed atomically as
``<data>/masakhaner2/<lang>/{train,dev,test}.txt`` and
``<data>/nusax-senti/<language>/{train,valid,test}.csv``, where ``<data>`` is ``--data-dir``, else
``$METAXL_DATA``, else ``~/.cache/metaxl/data`` (which :func:`metaxl.data.resolve_dataset`
searches last). An interrupted download resumes (HTTP Range) when the command is run again, and
finished languages are skipped, so re-running is cheap. ``$METAXL_DATA_URL`` replaces the URL base
(``https://raw.githubusercontent.com``) for a mirror laid out like it:
``<base>/<owner>/<repo>/<commit>/<path in the repo>``. MasakhaNER 2.0's ``ko`` and ``zh`` are not
offered: the copy the checksums were taken from has no training file for them.

    metaxl data download masakhaner2:luo masakhaner2:en
    metaxl data download masakhaner2:all nusax
    metaxl data download nusax:balinese --data-dir ./data

>>> [t.split(":")[0] for t in expand_names(["masakhaner2:luo", "nusax:ban"])]
['masakhaner2', 'nusax']
>>> file_url(SOURCES["nusax"], "balinese", "valid.csv", "https://example.org/")
'https://example.org/IndoNLP/nusax/75b0be5d982348332509f296e10d9bf9cb66d60f/datasets/sentiment/balinese/valid.csv'
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import data_checksums
from .errors import DataError

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
URL_ENV = "METAXL_DATA_URL"
CHUNK = 1 << 16
TIMEOUT_S = 60.0
RETRIES = 3
"""Automatic retries (each resuming where the last stopped) before a download gives up."""
RETRY_SLEEP_S = 1.0

__all__ = ["Source", "SOURCES", "URL_ENV", "languages", "expand_names", "file_url", "download", "register_cli"]


@dataclass(frozen=True)
class Source:
    """A corpus as its repository holds it: where, which commit, and the files' checksums."""

    corpus: str
    title: str
    folder: str
    """Folder under a data folder (as :func:`metaxl.data.resolve_dataset` looks it up)."""
    repo: str
    commit: str
    path: str
    licence: str
    files: dict[str, tuple[int, str]]
    """``<language>/<file>`` -> (bytes, sha256)."""

    def languages(self) -> tuple[str, ...]:
        return tuple(sorted({key.split("/")[0] for key in self.files}))

    def files_of(self, lang: str) -> list[tuple[str, int, str]]:
        return [(key.split("/")[1], size, sha) for key, (size, sha) in sorted(self.files.items())
                if key.split("/")[0] == lang]


SOURCES: dict[str, Source] = {
    "masakhaner2": Source(
        "masakhaner2", "MasakhaNER 2.0 transfer corpus", "masakhaner2", "masakhane-io/masakhane-ner",
        "ba5843cd08aa491d5f96a5e809e71eb9ec461391", "MasakhaNER2.0/transfer_corpus",
        "CC BY-NC 4.0 (MasakhaNER; non-commercial use); the high-resource languages come from their own "
        "NER corpora under their own terms (CoNLL-2003 for en)",
        data_checksums.MASAKHANER2,
    ),
    "nusax": Source(
        "nusax", "NusaX-Senti", "nusax-senti", "IndoNLP/nusax", "75b0be5d982348332509f296e10d9bf9cb66d60f",
        "datasets/sentiment", "CC BY-SA 4.0", data_checksums.NUSAX_SENTI,
    ),
}


def languages(corpus: str) -> tuple[str, ...]:
    """The languages ``metaxl data download`` can fetch for a corpus (``()`` for other corpora).

    >>> languages("nusax")[:3]
    ('acehnese', 'balinese', 'banjarese')
    >>> languages("wikiann")
    ()
    """
    source = SOURCES.get(corpus)
    return source.languages() if source else ()


def expand_names(names: Sequence[str]) -> list[str]:
    """``corpus:lang`` for every language the names ask for, in order, without repeats.

    ``masakhaner2:all`` and ``nusax`` (or ``nusax:all``) mean every language of the corpus; NusaX
    takes ISO codes too (``nusax:ban``).

    >>> expand_names(["nusax:ban", "nusax-senti:balinese", "masakhaner2:LUO"])
    ['nusax:balinese', 'masakhaner2:luo']
    """
    from .data import _CORPUS_ALIASES, _NUSAX_CODES

    out: list[str] = []
    for raw in names:
        head, _, lang = raw.strip().partition(":")
        corpus = _CORPUS_ALIASES.get(head.strip().lower())
        lang = lang.strip().lower()
        if corpus not in SOURCES:
            raise DataError(
                f"cannot download {raw!r}: metaxl data download fetches masakhaner2:<lang> (or masakhaner2:all) "
                f"and nusax / nusax:<language>; wikiann and marc load through Hugging Face datasets "
                f"(pip install 'metaxl[hub]'), sentipers and sentiraama by hand (see README, Data)"
            )
        source = SOURCES[corpus]
        if not lang and corpus == "masakhaner2":
            raise DataError(
                f"{raw}: name a language (masakhaner2:luo) or all (masakhaner2:all, 74 MB); "
                f"languages: {', '.join(source.languages())}"
            )
        if corpus == "nusax":
            lang = _NUSAX_CODES.get(lang, lang)
        wanted = source.languages() if lang in ("", "all") else (lang,)
        for one in wanted:
            if one not in source.languages():
                raise DataError(
                    f"{raw}: {one!r} is not a language of {source.title} at the pinned commit; "
                    f"languages: {', '.join(source.languages())}"
                )
            name = f"{corpus}:{one}"
            if name not in out:
                out.append(name)
    return out


def file_url(source: Source, lang: str, fname: str, base: str | None = None) -> str:
    """The URL of one file: ``<base>/<repo>/<commit>/<path>/<lang>/<file>``."""
    base = (base or os.environ.get(URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    return f"{base}/{source.repo}/{source.commit}/{source.path}/{lang}/{fname}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _matches(path: Path, size: int, sha: str) -> bool:
    return path.is_file() and path.stat().st_size == size and _sha256(path) == sha


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class _Interrupted(Exception):
    pass


def _fetch(url: str, part: Path, size: int, progress: bool, label: str, retries: int, sleep_s: float) -> None:
    """Download ``url`` into ``part`` until it has ``size`` bytes, resuming what ``part`` holds."""
    from tqdm.auto import tqdm

    reason = ""
    got_any = part.exists() and part.stat().st_size > 0
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(sleep_s * attempt)
        have = part.stat().st_size if part.exists() else 0
        if have > size:  # not this file's start: begin again
            part.unlink()
            have = 0
        if have == size:
            return
        headers = {"User-Agent": "metaxl-data-download"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
                if have and resp.status != 206:  # the server ignored the range: start over
                    have = 0
                with open(part, "ab" if have else "wb") as f, tqdm(
                    total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                    disable=not progress, leave=False, file=sys.stderr,
                ) as bar:
                    while block := resp.read(CHUNK):
                        if have + len(block) > size:
                            f.write(block[: size - have + 1])  # one byte too many: the checksum will fail
                            return
                        f.write(block)
                        have += len(block)
                        got_any = True
                        bar.update(len(block))
            if have == size:
                return
            reason = f"the connection closed after {have} of {size} bytes"
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the range is past the end: the partial file is not ours
                part.unlink(missing_ok=True)
                reason = "HTTP 416"
                continue
            if e.code >= 500 or e.code == 429:
                reason = f"HTTP {e.code} {e.reason}"
                continue
            raise DataError(
                f"{url}: HTTP {e.code} {e.reason}; if {URL_ENV} is set, check that the mirror holds this path "
                f"(laid out as <base>/<owner>/<repo>/<commit>/<path>), else retry later"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            inner = getattr(e, "reason", None) or e
            reason = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
            if part.exists() and part.stat().st_size > 0:
                got_any = True
            if not got_any and isinstance(e, urllib.error.URLError):
                break  # no connection at all (refused, no DNS): retrying will not help
    have = part.stat().st_size if part.exists() else 0
    if not got_any:
        raise DataError(
            f"cannot download {url} ({reason}); check the internet connection (GitHub must be reachable), "
            f"or set {URL_ENV} to a mirror"
        )
    raise _Interrupted(
        f"download of {url} interrupted after {have} of {size} bytes ({reason}); run the same command again "
        f"to resume it"
    )


def _install_language(source: Source, lang: str, root: Path, base: str | None, progress: bool, force: bool,
                      retries: int, sleep_s: float) -> tuple[str, int]:
    """Fetch the missing files of one language; returns (status, bytes downloaded)."""
    final = root / source.folder / lang
    staging = root / source.folder / f".{lang}.download"
    files = source.files_of(lang)
    todo = []
    for fname, size, sha in files:
        target = final / fname
        if _matches(target, size, sha):
            continue
        if target.exists() and not force:
            raise DataError(
                f"{target} exists but is not the pinned version ({_size(target.stat().st_size)}, expected "
                f"{_size(size)} with sha256 {sha[:12]}...); move it away, or pass --force to replace it"
            )
        todo.append((fname, size, sha))
    if not todo:
        return "up to date", 0
    staging.mkdir(parents=True, exist_ok=True)
    try:
        fetched = _fetch_into(source, lang, staging, todo, base, progress, retries, sleep_s)
    finally:
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()  # nothing to resume
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)  # the whole language appears at once
    else:
        for fname, _, _ in todo:
            os.replace(staging / fname, final / fname)
        shutil.rmtree(staging, ignore_errors=True)
    return "downloaded", fetched


def _fetch_into(source: Source, lang: str, staging: Path, todo: list[tuple[str, int, str]], base: str | None,
                progress: bool, retries: int, sleep_s: float) -> int:
    """Download ``todo`` into ``staging`` (``<file>.part`` until verified, then ``<file>``)."""
    fetched = 0
    for fname, size, sha in todo:
        done, part = staging / fname, staging / f"{fname}.part"
        if _matches(done, size, sha):
            continue
        url = file_url(source, lang, fname, base)
        _fetch(url, part, size, progress, f"{source.corpus}:{lang} {fname}", retries, sleep_s)
        got = _sha256(part)
        if got != sha or part.stat().st_size != size:
            n = part.stat().st_size
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(
                f"{url}: checksum mismatch (got {n} bytes with sha256 {got[:16]}..., expected {size} bytes "
                f"with sha256 {sha[:16]}...); nothing was installed. The server sent another version of the "
                f"file: if {URL_ENV} is set, check the mirror, else retry later"
            )
        os.replace(part, done)
        fetched += size
    return fetched


def download(
    names: Sequence[str],
    data_dir: str | Path | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    force: bool = False,
    retries: int = RETRIES,
    retry_sleep_s: float = RETRY_SLEEP_S,
    out: TextIO | None = None,
) -> list[Path]:
    """Download corpora (``masakhaner2:luo``, ``masakhaner2:all``, ``nusax``, ``nusax:balinese``).

    Returns the language folders. ``data_dir`` defaults to ``$METAXL_DATA``, else
    ``~/.cache/metaxl/data``. Languages whose files are there and match their checksums are
    skipped; an interrupted file resumes from where it stopped; ``force`` replaces files that
    differ from the pinned version (otherwise an error). Raises :class:`~metaxl.errors.DataError`
    with what to do when a download fails; nothing half-written is left in a language folder.
    """
    from .data import DATA_ENV, data_dirs, download_dir

    out = out if out is not None else sys.stdout
    wanted = expand_names(names)
    if not wanted:
        raise DataError("nothing to download: name data sets, e.g. metaxl data download masakhaner2:luo nusax")
    root = Path(os.path.normpath(Path(data_dir or os.environ.get(DATA_ENV) or download_dir()).expanduser().absolute()))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {root} ({e.strerror}); pass --data-dir DIR") from None
    folders: list[Path] = []
    total = 0
    licences: dict[str, str] = {}
    for name in wanted:
        corpus, _, lang = name.partition(":")
        source = SOURCES[corpus]
        try:
            status, fetched = _install_language(source, lang, root, base_url, progress, force, retries, retry_sleep_s)
        except _Interrupted as e:
            raise DataError(str(e)) from None
        total += fetched
        folder = root / source.folder / lang
        print(f"{name:<22} {status:<10} {_size(fetched) if fetched else '':>8}  {folder}", file=out)
        folders.append(folder)
        licences[source.title] = source.licence
    for title, licence in licences.items():
        print(f"{title}: {licence}", file=out)
    summary = f"{len(folders)} data set(s) in {root} ({_size(total)} downloaded now)"
    if root in data_dirs():
        print(f"{summary}, a folder metaxl searches: use the names as they are, e.g. --target {wanted[0]}", file=out)
    else:
        print(f"{summary}; pass --data-dir {root} (or set ${DATA_ENV}={root}) to use them", file=out)
    return folders


# ---------------------------------------------------------------------------- CLI
COMMAND = "data-download"
"""Parser name of ``metaxl data download`` (``metaxl.cli`` routes ``data download`` to it)."""


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        COMMAND, prog="metaxl data download", description=__doc__.split("\n\n>>>")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="masakhaner2:<lang>, masakhaner2:all, nusax, nusax:<language>")
    p.add_argument("--data-dir", help="where to put them (default: $METAXL_DATA, else ~/.cache/metaxl/data)")
    p.add_argument("--force", action="store_true", help="replace files that differ from the pinned version")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    download(args.names, args.data_dir, progress=not args.no_progress, force=args.force)
    return 0


def route_argv(argv: Sequence[str]) -> list[str]:
    """``metaxl data download ...`` -> the download parser (``metaxl data NAME...`` is left alone).

    >>> route_argv(["--debug", "data", "download", "nusax"])
    ['--debug', 'data-download', 'nusax']
    >>> route_argv(["data", "masakhaner2:luo"])
    ['data', 'masakhaner2:luo']
    """
    argv = list(argv)
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    if argv[i : i + 2] == ["data", "download"]:
        return argv[:i] + [COMMAND] + argv[i + 2 :]
    return argv
