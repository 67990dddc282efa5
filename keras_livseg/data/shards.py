"""TFRecord shards of ``tf.train.Example`` slices, written without importing TensorFlow.

``prepare`` runs one worker process per core; importing TensorFlow in each would cost
hundreds of MB of memory a worker and make forking unsafe. The two formats involved are
small and stable, so they are written here directly:

- ``tf.train.Example`` is a protocol buffer: ``Example{features: Features{feature: map<string,
  Feature>}}`` with ``Feature`` one of ``BytesList`` (field 1), ``FloatList`` (2, packed) or
  ``Int64List`` (3, packed). Keys are written sorted, so the bytes are deterministic.
- A TFRecord file is a sequence of ``uint64 length, uint32 masked_crc32c(length), data,
  uint32 masked_crc32c(data)``, little endian; the GZIP variant is the same stream gzipped
  (written with ``mtime=0`` so that output is byte-identical run to run).

A test parses what these functions write with ``tf.data.TFRecordDataset`` and
``tf.io.parse_single_example``.

Feature keys of a slice example (see :data:`FEATURE_SPEC`): ``image`` (float16 bytes,
``[height, width, context]``, windowed HU, not standardized), ``mask`` (uint8 bytes,
``[height, width]``), ``height``, ``width``, ``context``, ``case_id``, ``slice_index``,
``liver_pixels``, ``tumor_pixels``, ``volume_mean`` and ``volume_std`` (the case's own
windowed statistics, for per-volume normalization).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

import google_crc32c
import numpy as np

from keras_livseg.data.atomic import partial_path

IMAGE_DTYPE = np.float16
MASK_DTYPE = np.uint8


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf encodes negative int64 as ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    # Wire type 2: length-delimited.
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _feature(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        values = [bytes(value)]
        return _field(1, b"".join(_field(1, v) for v in values))
    if isinstance(value, str):
        return _field(1, _field(1, value.encode("utf-8")))
    array = np.atleast_1d(np.asarray(value))
    if array.dtype.kind in "iub":
        return _field(3, _field(1, b"".join(_varint(int(v)) for v in array)))
    if array.dtype.kind == "f":
        return _field(2, _field(1, array.astype("<f4").tobytes()))
    raise TypeError(f"cannot encode feature value of dtype {array.dtype}")


def encode_example(features: Mapping[str, object]) -> bytes:
    """Serialize a ``tf.train.Example`` from ``{key: bytes | str | int | float | array}``.

    Integers become ``Int64List``, floats ``FloatList`` (float32), bytes and str ``BytesList``.

    Example:
        >>> record = encode_example({"height": 2, "image": b"\\x00\\x01"})
        >>> len(record) > 0
        True
    """
    entries = []
    for key in sorted(features):
        entry = _field(1, key.encode("utf-8")) + _field(2, _feature(features[key]))
        entries.append(_field(1, entry))
    return _field(1, b"".join(entries))


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return struct.pack("<I", masked)


def _gzipped(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first 12 bytes or more) is GZIP, not TFRecord.

    The magic bytes alone are not enough: an uncompressed TFRecord whose first record is
    0x8B1F bytes long (mod 65536) starts with them too, but its header carries a valid CRC.
    """
    if head[:2] != b"\x1f\x8b":
        return False
    return not (len(head) >= 12 and _masked_crc(head[:8]) == head[8:12])


class _HashedFile:
    """A binary file opened for writing that keeps the SHA-256 of every byte written to it
    (``digest`` None: passes the bytes through only)."""

    def __init__(self, raw: BinaryIO, digest: bool = True) -> None:
        self.raw = raw
        self.digest = hashlib.sha256() if digest else None

    def write(self, data: bytes) -> int:
        if self.digest is not None:
            self.digest.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class TFRecordWriter:
    """Append records to a TFRecord file (optionally GZIP), under a temporary name until closed.

    The file is written as ``.partial-<name>`` (:func:`~keras_livseg.data.atomic.partial_path`) and renamed on :meth:`close`, so an interrupted
    run never leaves a shard that looks finished. :attr:`sha256` is the file's SHA-256, kept
    while writing (no second reading of the file) unless ``digest=False``.

    Example:
        >>> with TFRecordWriter("/tmp/x.tfrecord") as writer:  # doctest: +SKIP
        ...     writer.write(encode_example({"a": 1}))
    """

    def __init__(self, path: str | Path, compression: str | None = None, digest: bool = True) -> None:
        self.path = Path(path)
        self.temporary = partial_path(self.path)
        self.compression = compression
        self._raw: BinaryIO = open(self.temporary, "wb")
        self._hashed = _HashedFile(self._raw, digest)
        self._stream: BinaryIO | _HashedFile | gzip.GzipFile = self._hashed
        if compression == "GZIP":
            self._stream = gzip.GzipFile(filename="", mode="wb", fileobj=self._hashed, mtime=0, compresslevel=6)
        elif compression not in (None, ""):
            raise ValueError(f"compression must be None or 'GZIP', got {compression!r}")
        self.bytes_written = 0
        self.records = 0

    def write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._stream.write(header + _masked_crc(header) + record + _masked_crc(record))
        self.bytes_written += len(record) + 16
        self.records += 1

    def append_file(self, path: str | Path, block: int = 1 << 22) -> None:
        """Append every record of an uncompressed TFRecord file as its bytes stand.

        TFRecord framing is self-contained (each record carries its length and CRCs), so two
        files' bytes one after the other are one valid file: no record is parsed or framed
        again. Only for an uncompressed writer; :attr:`records` does not count these.
        """
        if self.compression:
            raise ValueError("append_file copies uncompressed records; write them one by one into a GZIP writer")
        with open(path, "rb") as source:
            if _gzipped(source.read(12)):
                raise ValueError(f"{path} is GZIP-compressed: append_file takes uncompressed TFRecord files")
            source.seek(0)
            for chunk in iter(lambda: source.read(block), b""):
                self._hashed.write(chunk)
                self.bytes_written += len(chunk)

    @property
    def sha256(self) -> str:
        """SHA-256 (hex) of the bytes written so far; of the whole file once closed."""
        if self._hashed.digest is None:
            raise ValueError(f"{self.path} is written with digest=False: it keeps no SHA-256")
        return self._hashed.digest.hexdigest()

    def close(self) -> Path:
        if self._stream is not self._hashed:
            self._stream.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self.temporary.replace(self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (on error)."""
        try:
            if self._stream is not self._hashed:
                self._stream.close()
            self._raw.close()
        finally:
            self.temporary.unlink(missing_ok=True)

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_records(path: str | Path) -> list[bytes]:
    """Read every record of a (possibly GZIP) TFRecord file, checking the CRCs.

    Used by tests and by ``prepare --resume`` to verify existing shards without TensorFlow.
    """
    path = Path(path)
    data = path.read_bytes()
    if _gzipped(data[:12]):
        data = gzip.decompress(data)
    stream = io.BytesIO(data)
    records = []
    while True:
        header = stream.read(8)
        if not header:
            return records
        if len(header) < 8 or stream.read(4) != _masked_crc(header):
            raise ValueError(f"{path} is truncated or corrupt (bad record header)")
        (length,) = struct.unpack("<Q", header)
        record = stream.read(length)
        if len(record) != length or stream.read(4) != _masked_crc(record):
            raise ValueError(f"{path} is truncated or corrupt (bad record data)")
        records.append(record)


def slice_example(
    image: np.ndarray,
    mask: np.ndarray,
    case_id: str,
    slice_index: int,
    volume_mean: float,
    volume_std: float,
) -> bytes:
    """Encode one slice (or 2.5D stack) as a ``tf.train.Example``.

    Args:
        image: windowed HU ``[height, width, context]`` (stored as float16).
        mask: labels ``[height, width]`` in ``{0, 1, 2}``.
        case_id: the case the slice comes from.
        slice_index: index of the centre slice in the canonical volume.
        volume_mean, volume_std: the case's windowed statistics (per-volume normalization).
    """
    height, width, context = image.shape
    mask = np.ascontiguousarray(mask, dtype=MASK_DTYPE)
    return encode_example(
        {
            "image": np.ascontiguousarray(image, dtype=IMAGE_DTYPE).tobytes(),
            "mask": mask.tobytes(),
            "height": height,
            "width": width,
            "context": context,
            "case_id": case_id,
            "slice_index": int(slice_index),
            "liver_pixels": int(np.count_nonzero(mask)),
            "tumor_pixels": int(np.count_nonzero(mask == 2)),
            "volume_mean": float(volume_mean),
            "volume_std": float(volume_std),
        }
    )


def shard_name(split: str, index: int, count: int, compression: str | None) -> str:
    """``<split>-<i>-of-<n>.tfrecord[.gz]`` with zero-padded indices."""
    suffix = ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"
    return f"{split}-{index:05d}-of-{count:05d}{suffix}"


def plan_shards(record_bytes: Sequence[int], target_bytes: int) -> list[int]:
    """Split consecutive records into shards of about ``target_bytes``; returns records per shard."""
    counts: list[int] = []
    current = size = 0
    for nbytes in record_bytes:
        if current and size + nbytes > target_bytes:
            counts.append(current)
            current = size = 0
        current += 1
        size += nbytes
    if current:
        counts.append(current)
    return counts
