"""Direct chunk-file reads of local Zarr arrays equal Zarr's own reads, or defer to them."""

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from distpen._chunkio import _zstd_size, direct_layout, read_rows, sweep_temporaries, write_chunk

CODECS = {
    "none": None,
    "zstd": ZstdCodec(level=1),
    "zstd-checksum": ZstdCodec(level=3, checksum=True),
    "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "gzip": GzipCodec(level=1),
}

RANGES = [(0, 7), (0, 8), (3, 21), (8, 16), (16, 45), (40, 45), (44, 45), (0, 45), (10, 10), (-3, 60)]


def _array(tmp_path, name, data, chunks, compressor, fill=0, write_rows=None):
    arr = zarr.create_array(str(tmp_path / name), shape=data.shape, chunks=chunks, dtype=data.dtype,
                            compressors=compressor, fill_value=fill)
    if write_rows is None:
        arr[...] = data
    else:
        for r0, r1 in write_rows:
            arr[r0:r1] = data[r0:r1]
    return zarr.open_array(str(tmp_path / name), mode="r")


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_direct_reads_equal_zarr_reads(tmp_path, codec, dtype):
    rng = np.random.default_rng(0)
    data = (rng.random((45, 13)) * 100 * (rng.random((45, 13)) < 0.4)).astype(dtype)
    arr = _array(tmp_path, "a", data, (8, 13), CODECS[codec])
    assert direct_layout(arr) is not None
    for r0, r1 in RANGES:
        got = read_rows(arr, r0, r1)
        want = data[max(r0, 0):r1]
        assert got.dtype == data.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(read_rows(arr, r0, r1, 2, 9), data[max(r0, 0):r1, 2:9])


def test_missing_chunks_read_as_the_fill_value(tmp_path):
    data = np.arange(40 * 3, dtype=np.int32).reshape(40, 3)
    arr = _array(tmp_path, "a", data, (10, 3), CODECS["zstd"], fill=-1, write_rows=[(0, 10), (30, 40)])
    got = read_rows(arr, 5, 35)
    want = data[5:35].copy()
    want[5:25] = -1
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, arr[5:35])


def test_wider_chunks_and_one_dimensional_arrays(tmp_path):
    data = np.random.default_rng(1).random((30, 5)).astype(np.float32)
    wide = _array(tmp_path, "w", data, (7, 8), CODECS["blosc"])  # chunks wider than the array
    assert direct_layout(wide) is not None
    np.testing.assert_array_equal(read_rows(wide, 3, 29), data[3:29])
    vec = _array(tmp_path, "v", data[:, 0].copy(), (4,), CODECS["gzip"])
    assert direct_layout(vec) is not None
    np.testing.assert_array_equal(read_rows(vec, 2, 27), data[2:27, 0])


def test_other_layouts_are_read_by_zarr(tmp_path):
    data = np.random.default_rng(2).random((20, 6))
    cols = _array(tmp_path, "c", data, (5, 3), CODECS["zstd"])  # chunked across columns
    sharded = zarr.create_array(str(tmp_path / "s"), shape=data.shape, chunks=(5, 6), shards=(10, 6),
                                dtype=data.dtype)
    sharded[...] = data
    v2 = zarr.create_array(str(tmp_path / "v2"), shape=data.shape, chunks=(5, 6), dtype=data.dtype,
                           zarr_format=2)
    v2[...] = data
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=data.shape, chunks=(5, 6), dtype=data.dtype)
    mem[...] = data
    for arr in (cols, sharded, v2, mem, data):
        assert direct_layout(arr) is None
        np.testing.assert_array_equal(read_rows(arr, 3, 17), data[3:17])
        np.testing.assert_array_equal(read_rows(arr, 3, 17, 1, 4), data[3:17, 1:4])


def test_a_corrupt_chunk_is_an_error_not_a_silent_short_read(tmp_path):
    data = np.ones((16, 4), dtype=np.float64)
    arr = _array(tmp_path, "a", data, (8, 4), None)
    path = tmp_path / "a" / "c" / "1" / "0"
    path.write_bytes(path.read_bytes()[:-8])  # 8 bytes short
    np.testing.assert_array_equal(read_rows(arr, 0, 8), data[:8])
    with pytest.raises(ValueError, match="decodes to 248 bytes, expected 256"):
        read_rows(arr, 0, 16)


def test_zstd_header_size():
    from numcodecs import Zstd

    for n in (0, 1, 255, 256, 300, 70_000, 5_000_000):
        assert _zstd_size(Zstd(level=1).encode(np.zeros(n, dtype=np.uint8).tobytes())) in (n, None)
    assert _zstd_size(Zstd(level=1).encode(np.zeros(70_000, dtype=np.uint8).tobytes())) == 70_000
    assert _zstd_size(b"not zstd at all") is None


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_direct_writes_read_back_through_zarr(tmp_path, codec, dtype):
    """Chunks written directly are what Zarr writes: Zarr reads them back, fill-only chunks are
    absent, and edge chunks (smaller than the chunk shape) go through Zarr."""
    rng = np.random.default_rng(3)
    arr = zarr.create_array(str(tmp_path / "a"), shape=(20, 14), chunks=(8, 6), dtype=dtype,
                            compressors=CODECS[codec], fill_value=0)
    assert direct_layout(arr, rows=False) is not None
    want = np.zeros((20, 14), dtype=dtype)
    for I in range(3):
        for J in range(3):
            shape = (min(8, 20 - 8 * I), min(6, 14 - 6 * J))
            block = (rng.random(shape) * 50 * (rng.random(shape) < 0.5)).astype(dtype)
            if (I, J) == (1, 1):
                block[...] = 0  # a fill-only chunk is not written
            write_chunk(arr, (I, J), block)
            want[8 * I:8 * I + shape[0], 6 * J:6 * J + shape[1]] = block
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[...], want)
    assert not (tmp_path / "a" / "c" / "1" / "1").exists()
    assert (tmp_path / "a" / "c" / "0" / "0").exists()
    assert not [p for p in (tmp_path / "a").rglob("*.tmp-*")]  # no temporary file left behind
    # rewriting a chunk with the fill value removes its file, as Zarr does
    write_chunk(arr, (0, 0), np.zeros((8, 6), dtype=dtype))
    assert not (tmp_path / "a" / "c" / "0" / "0").exists()
    np.testing.assert_array_equal(arr[0:8, 0:6], 0)


def test_write_chunk_defers_to_zarr_and_checks_coords(tmp_path):
    data = np.arange(36.0).reshape(6, 6)
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=(12, 12), chunks=(6, 6), dtype=np.float64)
    write_chunk(mem, (1, 0), data)
    np.testing.assert_array_equal(mem[6:12, 0:6], data)
    with pytest.raises(ValueError, match="one chunk index per dimension"):
        write_chunk(mem, (1,), data)
    ro = zarr.create_array(str(tmp_path / "r"), shape=(12, 12), chunks=(6, 6), dtype=np.float64)
    with pytest.raises(Exception):  # a read-only array refuses, through Zarr
        write_chunk(zarr.open_array(str(tmp_path / "r"), mode="r"), (0, 0), data)
    assert not (tmp_path / "r" / "c" / "0" / "0").exists()
    write_chunk(ro, (0, 1), data)
    np.testing.assert_array_equal(ro[0:6, 6:12], data)


def _fs_takes_o_direct(directory) -> bool:
    import os

    probe = os.path.join(directory, "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_direct_io_writes_exactly_the_payload(tmp_path, monkeypatch, size):
    import distpen._chunkio as cio

    monkeypatch.setattr(cio, "DIRECT_IO_MIN_BYTES", 0)
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    wrote = cio._write_direct(str(path), payload)
    assert wrote == _fs_takes_o_direct(str(tmp_path))  # falls back only where the file system refuses
    if wrote:
        assert path.read_bytes() == payload  # padded to whole blocks, then truncated
    monkeypatch.setenv("DISTPEN_DIRECT_IO", "0")
    assert cio._write_direct(str(tmp_path / "g"), payload) is False and not (tmp_path / "g").exists()


@pytest.mark.parametrize("codec", ["none", "blosc"])
def test_large_chunks_written_directly_read_back(tmp_path, monkeypatch, codec):
    """Chunks above DIRECT_IO_MIN_BYTES take the O_DIRECT path, and a file system that refuses it
    gets a buffered write: either way Zarr reads the same array back."""
    import os

    import distpen._chunkio as cio

    monkeypatch.setattr(cio, "DIRECT_IO_MIN_BYTES", 1000)
    data = np.random.default_rng(4).random((64, 64))
    for refuse in (False, True):
        if refuse:
            real_open = os.open

            def no_direct(path, flags, *a):
                if flags & os.O_DIRECT:
                    raise OSError(22, "Invalid argument")
                return real_open(path, flags, *a)

            monkeypatch.setattr(cio.os, "open", no_direct)
        name = f"a{refuse}"
        arr = zarr.create_array(str(tmp_path / name), shape=(128, 64), chunks=(64, 64), dtype=np.float64,
                                compressors=CODECS[codec])
        write_chunk(arr, (0, 0), data)
        write_chunk(arr, (1, 0), data[::-1].copy())
        got = zarr.open_array(str(tmp_path / name), mode="r")[...]
        np.testing.assert_array_equal(got, np.concatenate([data, data[::-1]]))
        assert not [p for p in (tmp_path / name).rglob("*.tmp-*")]


def test_sweep_removes_only_old_temporary_files(tmp_path):
    import os
    import time

    (tmp_path / "c" / "0").mkdir(parents=True)
    old_tmp = tmp_path / "c" / "0" / "3.tmp-12-34"
    new_tmp = tmp_path / "c" / "0" / "4.tmp-12-35"
    chunk = tmp_path / "c" / "0" / "3"
    for p in (old_tmp, new_tmp, chunk):
        p.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old_tmp, (past, past))
    os.utime(chunk, (past, past))
    assert sweep_temporaries(str(tmp_path), older_than=600) == 1
    assert not old_tmp.exists() and new_tmp.exists() and chunk.exists()
    assert sweep_temporaries(str(tmp_path / "missing")) == 0


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_read_rows_into_a_given_buffer(tmp_path, codec):
    """``out=``: chunks decode straight into the caller's buffer (a view into a larger one too);
    a buffer of the wrong shape or dtype is refused; arrays Zarr reads are copied in."""
    data = np.random.default_rng(3).random(45)
    arr = _array(tmp_path, "v", data, (8,), CODECS[codec])
    big = np.full(60, -1.0)
    view = big[5:5 + 33]
    assert read_rows(arr, 3, 36, out=view) is view
    np.testing.assert_array_equal(big[5:38], data[3:36])
    assert (big[:5] == -1).all() and (big[38:] == -1).all()
    with pytest.raises(ValueError, match="out must be"):
        read_rows(arr, 3, 36, out=np.empty(32))
    with pytest.raises(ValueError, match="out must be"):
        read_rows(arr, 3, 36, out=np.empty(33, dtype=np.float32))
    sharded = zarr.create_array(str(tmp_path / "s"), shape=data.shape, chunks=(5,), shards=(10,), dtype=data.dtype)
    sharded[...] = data
    assert direct_layout(sharded) is None
    out = np.empty(20)
    assert read_rows(sharded, 10, 30, out=out) is out
    np.testing.assert_array_equal(out, data[10:30])
