"""The buffer pool of large work arrays (distpen/_alloc.py)."""

from __future__ import annotations

import numpy as np

from distpen._alloc import BufferPool, zeros


def test_pool_gives_the_smallest_buffer_that_fits_whatever_its_place():
    pool = BufferPool()
    big, small, mid = np.empty(4000, np.uint8), np.empty(1000, np.uint8), np.empty(2000, np.uint8)
    for b in (big, small, mid):
        pool.give(b)
    # the fitting buffer is not the first in the pool: taking it must not compare arrays elementwise
    assert pool.take(1500) is mid
    assert pool.take(900) is small
    assert pool.nbytes == 4000
    assert pool.take(5000).nbytes == 5000  # none fits: a new one, after dropping one so as not to hoard
    assert pool.nbytes == 0
    pool.give(big)
    assert pool.clear() == 4000 and pool.nbytes == 0


def test_zeros_are_zero_at_every_size():
    for shape in ((3, 4), (1 << 19,), (300, 1000)):
        z = zeros(shape, np.float32)
        assert z.shape == shape and z.dtype == np.float32 and not z.any() and z.flags.c_contiguous
