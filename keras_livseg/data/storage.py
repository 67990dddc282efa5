"""Object storage (``gs://``, ``s3://``) for the commands' path arguments, staged through local disk.

Every command works on local files; where an argument is a URL, it works on a local mirror:

- **inputs** (one object, or every object under a prefix, which is what a "folder" is in a
  bucket) are downloaded into ``$KERAS_LIVSEG_CACHE/remote/<scheme>/<bucket>/<key>``; an object
  already there with the same size is not fetched again;
- **outputs** are written into such a mirror and uploaded when the step is done, the files that
  mark a result complete (``manifest.json``, ``saved_model.pb``, ``complete.json``) last, so that
  a reader polling the bucket never takes a half-uploaded result for a finished one.

Why staging rather than reading the bucket in place: nibabel and pydicom read local files,
TensorFlow 2.21 reads ``gs://`` but no longer ``s3://`` (that moved to tensorflow-io), and a
volume or shard is read whole anyway. The cost is local disk for the data in use.

Files go through fsspec: ``gcsfs`` for ``gs://`` (extra ``[gcs]``), ``s3fs`` for ``s3://`` (extra
``[s3]``). Credentials and endpoints are the libraries' own: for S3, the AWS variables and
``AWS_ENDPOINT_URL`` (MinIO, an emulator); for GCS, Application Default Credentials and
``STORAGE_EMULATOR_HOST``. Unreachable storage fails after two attempts with one line.

Example:
    >>> is_url("s3://bucket/lits"), is_url("data/lits")
    (True, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from keras_livseg.data.atomic import atomic_path, atomic_write_json
from keras_livseg.data.errors import DataError

logger = logging.getLogger(__name__)

#: Schemes read and written here, with the package and the extra that provide each.
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
#: Files that mark a result complete: uploaded last.
COMPLETION_MARKERS = ("manifest.json", "saved_model.pb", "complete.json")
_TIMEOUT_S = 20


def is_url(value: str | os.PathLike | None) -> bool:
    """Whether ``value`` names object storage (``scheme://...``, not ``file://``)."""
    text = str(value or "")
    return "://" in text and not text.startswith("file://")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def filesystem(url: str):
    """The fsspec filesystem of ``url`` and the path within it.

    Raises:
        DataError: a scheme with no filesystem installed (naming the extra) or an unknown one.
    """
    scheme = _scheme(url)
    if scheme not in SCHEMES:
        raise DataError(f"{url}: the scheme {scheme}:// is not supported; use a local path, s3:// or gs://")
    package, extra = SCHEMES[scheme]
    if package == "gcsfs" and os.environ.get("STORAGE_EMULATOR_HOST"):
        # gcsfs asks each bucket's type over gRPC (hierarchical namespaces), which emulators do not
        # serve: a minute's timeout per call. Read at gcsfs's import, hence before it.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        __import__(package)
    except ImportError:
        raise DataError(f'{url} needs {package} for {scheme}:// URLs: pip install "keras_livseg[{extra}]"') from None
    import fsspec

    if scheme == "s3":
        options = {"config_kwargs": {"connect_timeout": _TIMEOUT_S, "read_timeout": _TIMEOUT_S * 3,
                                     "retries": {"max_attempts": 2, "mode": "standard"}}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    else:
        options = {"requests_timeout": _TIMEOUT_S}
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            options["token"] = "anon"  # an emulator takes no credentials
    if scheme != "s3" and os.environ.get("STORAGE_EMULATOR_HOST"):
        from gcsfs.core import GCSFileSystem  # the plain class, whatever gcsfs registered (see above)

        fs = GCSFileSystem(**options)
        path = fs._strip_protocol(url)
    else:
        fs, path = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()  # fsspec caches listings per instance: another process may have written since
    return fs, path


def _unreachable(url: str, error: BaseException) -> DataError:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DataError(f"cannot reach {url} ({type(error).__name__}: {text}); check the URL, the credentials "
                     "and the endpoint (AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST for local servers)")


def _cache_root() -> Path:
    return Path(os.environ.get("KERAS_LIVSEG_CACHE", ".cache/keras_livseg")) / "remote"


_STATE = ".synced.json"  # in a mirrored folder: what is known to equal the bucket (size, mtime)


def _load_state(folder: Path) -> dict[str, list[int]]:
    import json

    try:
        return json.loads((folder / _STATE).read_text())
    except (OSError, ValueError):
        return {}


def _save_state(folder: Path, state: dict[str, list[int]]) -> None:
    atomic_write_json(folder / _STATE, state, sort_keys=True)


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def mirror_path(url: str) -> Path:
    """The local folder or file that mirrors ``url``."""
    scheme, rest = url.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise DataError(f"{url} names no bucket; give s3://BUCKET/PATH or gs://BUCKET/PATH")
    return _cache_root() / scheme.lower() / Path(*parts)


def download(url: str) -> Path:
    """Mirror ``url`` (an object, or every object under it) locally and return the local path.

    Raises:
        DataError: nothing at ``url``, or the storage cannot be reached.
    """
    fs, path = filesystem(url)
    local = mirror_path(url)
    try:
        if fs.isfile(path):
            listing = {path: fs.info(path)}
            base = None
        else:
            listing = fs.find(path.rstrip("/") + "/", detail=True)
            base = path.rstrip("/")
    except FileNotFoundError as error:  # a missing bucket
        raise DataError(f"{url} does not exist ({str(error).splitlines()[0]}); check the URL") from None
    except Exception as error:  # botocore / aiohttp / google-auth errors are not all OSErrors
        raise _unreachable(url, error) from None
    if not listing:
        raise DataError(f"{url} does not exist (no object and no object under it); check the URL")
    fetched = 0
    state = _load_state(local) if base is not None else {}
    for key, info in sorted(listing.items()):
        relative = key[len(base) + 1:] if base is not None else ""
        target = local / Path(relative) if base is not None else local
        size = int(info.get("size") or 0)
        if target.is_file() and target.stat().st_size == size and (base is None or state.get(relative) == _stamp(target)):
            continue  # fetched before and untouched since
        with atomic_path(target) as partial:
            try:
                fs.get_file(key, str(partial))
            except Exception as error:  # only the transfer: local disk errors say what they are
                raise _unreachable(url, error) from None
        if base is not None:
            state[relative] = _stamp(target)
        fetched += 1
    if base is not None:
        _save_state(local, state)
    logger.info("%s: %d object(s), %d fetched into %s", url, len(listing), fetched, local)
    return local


def exists(url: str) -> bool:
    """Whether an object, or any object under the prefix, exists at ``url``."""
    fs, path = filesystem(url)
    try:
        return bool(fs.exists(path) or fs.find(path.rstrip("/") + "/", maxdepth=None))
    except Exception as error:
        raise _unreachable(url, error) from None


def child_names(url: str) -> list[str]:
    """Names directly under a prefix (objects and "folders"), as ``ls`` shows them; [] when none."""
    fs, path = filesystem(url)
    try:
        if not fs.exists(path.rstrip("/")):
            return []
        fs.invalidate_cache()
        return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path.rstrip("/"), detail=False)})
    except Exception as error:
        raise _unreachable(url, error) from None


def upload(local: str | Path, url: str, last: Sequence[str] = COMPLETION_MARKERS, mirror: bool = True) -> int:
    """Upload a local file, or a folder's files (recursively), to ``url``; returns the count.

    For a folder, only what changed since it was last uploaded or downloaded, in this order:
    the completion markers in the bucket are removed (from now on it reads as unfinished), the
    changed files are uploaded, objects under ``url`` that the folder no longer has are removed
    (``mirror``: a replaced result leaves no stale shard), and the markers named in ``last`` go
    up last. Files beginning with ``.`` (work files, partial writes) stay local.

    Raises:
        DataError: the storage cannot be reached or refuses the write.
    """
    fs, path = filesystem(url)
    local = Path(local)
    try:
        if local.is_file():
            fs.put_file(str(local), path)
            return 1
        root = path.rstrip("/")
        state = _load_state(local)
        files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(local).parts)}
        existing = {k[len(root) + 1:] for k in fs.find(root + "/")} if fs.exists(root) else set()
        # Known equal to the bucket: uploaded or downloaded by us and untouched since.
        changed = [rel for rel, p in files.items() if rel not in existing or state.get(rel) != _stamp(p)]
        extra = sorted(existing - set(files)) if mirror else []
        data = [rel for rel in changed if Path(rel).name not in last]
        markers = [rel for rel in files if Path(rel).name in last and (rel in changed or data or extra)]
        if data or extra:
            # From now until the markers are back, the folder reads as unfinished.
            stale = [f"{root}/{rel}" for rel in existing if Path(rel).name in last]
            if stale:
                fs.rm(stale)
        for rel in data:
            fs.put_file(str(files[rel]), f"{root}/{rel}")
            state[rel] = _stamp(files[rel])
        if extra:
            fs.rm([f"{root}/{rel}" for rel in extra])
            for rel in extra:
                state.pop(rel, None)
        for rel in markers:
            fs.put_file(str(files[rel]), f"{root}/{rel}")
            state[rel] = _stamp(files[rel])
        _save_state(local, state)
    except DataError:
        raise
    except Exception as error:
        raise _unreachable(url, error) from None
    count = len(data) + len(markers)
    if count or extra:
        logger.info("%s: %d file(s) uploaded, %d removed, from %s", url, count, len(extra), local)
    return count


def local_input(value: str | os.PathLike) -> Path:
    """``value`` itself when local; the local mirror of a URL (downloaded) otherwise.

    A ``.csv`` of image,label pairs in a bucket has its rows' URLs (and paths relative to the CSV)
    downloaded too, and is rewritten locally with the local paths.
    """
    if not is_url(value):
        return Path(value)
    url = str(value)
    local = download(url)
    if local.is_file() and local.suffix.lower() == ".csv":
        return _localize_csv(url, local)
    return local


def _localize_csv(url: str, local: Path) -> Path:
    import csv
    import io

    base = url.rsplit("/", 1)[0]
    with local.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
        fields = list(rows[0].keys()) if rows else ["image", "label"]
    for row in rows:
        for column in ("image", "label"):
            value = (row.get(column) or "").strip()
            if not value:
                continue
            remote = value if is_url(value) else (f"{base}/{value}" if not Path(value).is_absolute() else None)
            if remote is not None:
                row[column] = str(download(remote).resolve())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    target = local.with_name(f"{local.stem}.local-{hashlib.sha256(url.encode()).hexdigest()[:8]}.csv")
    target.write_text(text.getvalue())
    return target


def _pull(url: str, local: Path) -> None:
    """Make the mirror's files those of the bucket; its dot-files (local work for --resume) stay."""
    remote = exists(url)
    if remote:
        download(url)
    if local.is_dir():
        fs, path = filesystem(url)
        root = path.rstrip("/")
        keys = {k[len(root) + 1:] for k in fs.find(root + "/")} if remote else set()
        for file in sorted(local.rglob("*")):
            relative = file.relative_to(local)
            if file.is_file() and not any(part.startswith(".") for part in relative.parts) \
                    and relative.as_posix() not in keys:
                file.unlink()  # gone from the bucket: not part of its result any more


@contextlib.contextmanager
def local_output(value: str | os.PathLike, last: Sequence[str] = COMPLETION_MARKERS, pull: bool = False,
                 mirror: bool = True) -> Iterator[Path]:
    """Yield where to write ``value``: itself when local; a local mirror, uploaded on success, for a URL.

    ``pull``: first bring the mirror up to what the bucket holds (a finished or resumable
    result there is then seen as such: ``--resume`` and the refusal to overwrite work as on a
    local folder). Nothing is uploaded when the block raises: a failed step leaves the bucket as
    it was (the mirror keeps the partial work for ``--resume``). ``mirror=False`` (a folder that
    collects results, such as predictions) leaves other objects under the URL alone.
    """
    if not is_url(value):
        yield Path(value)
        return
    url = str(value)
    filesystem(url)  # a missing extra or unknown scheme stops before any work
    local = mirror_path(url)
    if pull:
        _pull(url, local)
    local.parent.mkdir(parents=True, exist_ok=True)
    yield local
    if local.exists():
        upload(local, url, last, mirror=mirror)


def local_model(value: str | os.PathLike) -> Path:
    """A model argument made local: a ``.keras`` file with its run's ``preprocessing.json``, or a SavedModel folder.

    For ``.../RUN/checkpoints/best.keras`` in a bucket, the checkpoint and the ``preprocessing.json``
    beside it or in ``RUN/`` are downloaded, where the commands look for them.
    """
    if not is_url(value):
        return Path(value)
    url = str(value).rstrip("/")
    local = download(url)
    if url.endswith(".keras"):
        from keras_livseg.data.preprocessing import PREPROCESSING_FILE

        folder = url.rsplit("/", 1)[0]
        for candidate in (f"{folder}/{PREPROCESSING_FILE}", f"{folder.rsplit('/', 1)[0]}/{PREPROCESSING_FILE}"):
            if exists(candidate):
                download(candidate)
                break
    return local
