"""Fetches the official MNIST and CIFAR-10 distribution files, verified by their published md5 checksums.

``fetch_official("mnist")`` downloads the four MNIST files, ``fetch_official("cifar10")`` the CIFAR-10 binary
archive (and extracts its six batch files), into ``$MAGNET_MI_CACHE/<name>`` (default
``~/.cache/magnet_mi_jax/<name>``), and returns the folder, ready for :func:`magnet_mi_jax.data.load_dataset`.
Files already there with the right md5 are not fetched again.

Every file is written as ``<name>.part`` and renamed only once its md5 matches, so an interrupted or corrupted
download never leaves a file that looks complete; the error names the file, the URL and both checksums.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from tqdm.auto import tqdm

from magnet_mi_jax import datasets
from magnet_mi_jax.data import DataError, md5sum

CACHE_ENV = "MAGNET_MI_CACHE"
DEFAULT_CACHE = Path("~/.cache/magnet_mi_jax")

def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$MAGNET_MI_CACHE``, else ``~/.cache/magnet_mi_jax``."""
    chosen = root if root is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def fetch_official(name: str, root: str | os.PathLike | None = None, *, base_url: str | None = None,
                   md5: Mapping[str, str] | None = None, archive_md5: str | None = None,
                   progress: bool = True) -> Path:
    """Downloads (if needed) and verifies ``name``'s official files; returns the folder holding them.

    Args:
      name: a registered dataset whose config names a ``download`` (MNIST: Google's CVDF mirror; CIFAR-10:
        Alex Krizhevsky's page, the binary archive).
      root: the cache folder (default :func:`cache_dir`); the files go to ``root/name``.
      base_url: where the files are served (default: the config's ``download["url"]``).
      md5: file name -> expected md5 (default: the official checksums); for tests against other files.
      archive_md5: the CIFAR-10 archive's expected md5 (default: the official one).
      progress: show a progress bar per download.

    Raises:
      DataError: unknown dataset, unreachable URL, interrupted transfer, or a checksum mismatch (the message
        names the file, the URL and both checksums; nothing incomplete is left under the final name).
    """
    try:
        config = datasets.get(name)
    except datasets.UnknownDatasetError as err:
        raise DataError(str(err)) from None
    if config.download is None:
        with_download = [n for n in datasets.names() if datasets.get(n).download is not None]
        raise DataError(f"no official download for {name!r}; known: {', '.join(with_download)}")
    source = config.download
    base = base_url if base_url is not None else source["url"]
    expected = dict(config.official_md5 if md5 is None else md5)
    folder = cache_dir(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    missing = [f for f, want in expected.items() if not _verified(folder / f, want)]
    if not missing:
        return folder
    if "archive" not in source:
        for fname in missing:
            _download(base + fname, folder / fname, expected[fname], progress)
        return folder
    archive_name, official_archive_md5 = source["archive"]
    archive = folder / archive_name
    _download(base + archive_name, archive, archive_md5 or official_archive_md5, progress)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for fname in missing:
                member = f"{source['member_dir']}/{fname}"
                try:
                    extracted = tar.extractfile(member)
                except KeyError:
                    raise DataError(f"{archive} has no member {member}") from None
                part = folder / (fname + ".part")
                with extracted, open(part, "wb") as out:
                    shutil.copyfileobj(extracted, out)
                _accept(part, folder / fname, expected[fname], f"{member} of {archive}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{archive} is not a readable .tar.gz ({type(err).__name__}: {err}); delete it") from err
    archive.unlink()
    return folder


def _verified(path: Path, want: str) -> bool:
    return path.is_file() and md5sum(path) == want


def _download(url: str, dest: Path, want: str, progress: bool) -> None:
    """Streams ``url`` to ``dest.part``, checks the md5 and renames; removes the part file on any failure."""
    if _verified(dest, want):
        return
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(part, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                                               disable=not progress, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and part.stat().st_size != total:
                raise DataError(f"download of {url} was interrupted: {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({type(err).__name__}: {err}); check the network, or point "
                        "--data-dir / $MAGNET_MI_DATA_DIR at a folder holding the official files") from err
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _accept(part, dest, want, url)


def _accept(part: Path, dest: Path, want: str, origin: str) -> None:
    got = md5sum(part)
    if got != want:
        part.unlink()
        raise DataError(f"{dest.name} from {origin} has md5 {got}, expected {want}: corrupt or not the official "
                        "file; it was discarded")
    os.replace(part, dest)


__all__ = ["CACHE_ENV", "cache_dir", "fetch_official"]
