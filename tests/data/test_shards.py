import numpy as np
import pytest
import tensorflow as tf

from keras_livseg.data import shards


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_tensorflow_reads_what_we_write(tmp_path, compression):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, (16, 12, 3)).astype(np.float16)
    mask = rng.integers(0, 3, (16, 12)).astype(np.uint8)
    path = tmp_path / shards.shard_name("train", 0, 1, compression)
    with shards.TFRecordWriter(path, compression) as writer:
        for k in range(3):
            writer.write(shards.slice_example(image + k, mask, "case-7", k, -12.5, 80.0))
    assert not list(tmp_path.glob(".partial-*"))
    from keras_livseg.data.dataset import FEATURE_SPEC

    records = list(tf.data.TFRecordDataset(str(path), compression_type=compression or ""))
    assert len(records) == 3
    parsed = tf.io.parse_single_example(records[2], FEATURE_SPEC)
    got = tf.reshape(tf.io.decode_raw(parsed["image"], tf.float16), [16, 12, 3]).numpy()
    np.testing.assert_array_equal(got, image + 2)
    np.testing.assert_array_equal(tf.reshape(tf.io.decode_raw(parsed["mask"], tf.uint8), [16, 12]).numpy(), mask)
    assert parsed["case_id"].numpy() == b"case-7" and int(parsed["slice_index"]) == 2
    assert int(parsed["tumor_pixels"]) == int((mask == 2).sum()) and int(parsed["liver_pixels"]) == int((mask > 0).sum())
    assert float(parsed["volume_mean"]) == -12.5 and int(parsed["context"]) == 3
    assert shards.read_records(path) == [r.numpy() for r in records]
    import hashlib

    assert writer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # kept while writing


def test_appended_files_are_one_valid_file_with_its_hash(tmp_path):
    """Uncompressed TFRecord files copied byte for byte, one after the other: TensorFlow reads
    every record in order, and the kept SHA-256 is the file's."""
    import hashlib

    parts = []
    for k in range(3):
        parts.append(tmp_path / f"part{k}.tfrecord")
        with shards.TFRecordWriter(parts[-1], digest=False) as writer:
            for j in range(k + 1):
                writer.write(shards.encode_example({"k": np.array([k, j])}))
        with pytest.raises(ValueError, match="digest=False"):
            writer.sha256
    path = tmp_path / "joined.tfrecord"
    with shards.TFRecordWriter(path) as writer:
        writer.write(shards.encode_example({"k": np.array([9, 9])}))
        for part in parts:
            writer.append_file(part, block=7)  # blocks that cut records: bytes are bytes
    records = list(tf.data.TFRecordDataset(str(path)))
    keys = [tf.io.parse_single_example(r, {"k": tf.io.FixedLenFeature([2], tf.int64)})["k"].numpy().tolist() for r in records]
    assert keys == [[9, 9], [0, 0], [1, 0], [1, 1], [2, 0], [2, 1], [2, 2]]
    assert writer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert writer.bytes_written == path.stat().st_size
    gzipped = tmp_path / "z.tfrecord.gz"
    with shards.TFRecordWriter(gzipped, "GZIP") as writer:
        with pytest.raises(ValueError, match="uncompressed"):
            writer.append_file(parts[0])
    with shards.TFRecordWriter(tmp_path / "plain.tfrecord") as writer:
        with pytest.raises(ValueError, match="GZIP-compressed"):
            writer.append_file(gzipped)


def test_negative_and_large_integers_round_trip():
    record = shards.encode_example({"a": np.array([-5, 0, 2**40]), "b": "x"})
    parsed = tf.io.parse_single_example(
        record, {"a": tf.io.FixedLenFeature([3], tf.int64), "b": tf.io.FixedLenFeature([], tf.string)}
    )
    assert parsed["a"].numpy().tolist() == [-5, 0, 2**40]


def test_writer_abort_leaves_nothing(tmp_path):
    path = tmp_path / "x.tfrecord"
    with pytest.raises(RuntimeError):
        with shards.TFRecordWriter(path) as writer:
            writer.write(b"abc")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_record_is_detected(tmp_path):
    path = tmp_path / "x.tfrecord"
    with shards.TFRecordWriter(path) as writer:
        writer.write(b"abcdef")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        shards.read_records(path)


def test_plan_shards_keeps_target_size():
    assert shards.plan_shards([40, 40, 40, 40, 200, 10], 100) == [2, 2, 1, 1]
    assert shards.plan_shards([], 100) == []


def test_a_record_whose_length_looks_like_gzip_magic_is_still_plain_tfrecord(tmp_path):
    """A first record of 0x8B1F bytes makes the file start with GZIP's magic bytes; its header's
    CRC says it is TFRecord, and both readers treat it so."""
    record = b"x" * 0x8B1F
    path = tmp_path / "plain.tfrecord"
    with shards.TFRecordWriter(path) as writer:
        writer.write(record)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert shards.read_records(path) == [record]
    with shards.TFRecordWriter(tmp_path / "joined.tfrecord") as writer:
        writer.append_file(path)
    assert shards.read_records(tmp_path / "joined.tfrecord") == [record]
