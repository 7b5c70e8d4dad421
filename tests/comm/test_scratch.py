import threading

import torch

from fastnet.comm import scratch

CPU = torch.device("cpu")


def test_a_returned_buffer_is_reused_by_best_fit():
    small = scratch.take(100, torch.float32, CPU)
    big = scratch.take(1000, torch.float32, CPU)
    scratch.give(small, big)
    got = scratch.take(50, torch.float32, CPU)
    assert got.numel() == 50 and got.data_ptr() == small.data_ptr()  # the smallest that fits
    got2 = scratch.take(500, torch.float32, CPU)
    assert got2.data_ptr() == big.data_ptr()
    other = scratch.take(50, torch.float32, CPU)  # both are out: a new one
    assert other.data_ptr() not in (small.data_ptr(), big.data_ptr())
    scratch.give(got, got2, other)


def test_dtypes_do_not_share_buffers():
    f = scratch.take(64, torch.float32, CPU)
    scratch.give(f)
    h = scratch.take(64, torch.float16, CPU)
    assert h.dtype == torch.float16 and h.data_ptr() != f.data_ptr()
    scratch.give(h)


def test_double_give_keeps_one_copy_and_the_pool_is_bounded():
    a = scratch.take(10, torch.int64, CPU)
    scratch.give(a)
    scratch.give(a)
    x = scratch.take(10, torch.int64, CPU)
    y = scratch.take(10, torch.int64, CPU)
    assert x.data_ptr() != y.data_ptr()  # never the same buffer to two takers
    bufs = [scratch.take(1000 + i, torch.float64, CPU) for i in range(scratch.MAX_BUFFERS + 4)]
    scratch.give(*bufs, x, y)
    assert scratch.kept_bytes() <= scratch.MAX_BYTES
    assert len(scratch._free()) <= scratch.MAX_BUFFERS


def test_pools_are_per_thread():
    mine = scratch.take(256, torch.float32, CPU)
    scratch.give(mine)
    seen = []
    t = threading.Thread(target=lambda: seen.append(scratch.take(256, torch.float32, CPU).data_ptr()))
    t.start()
    t.join()
    assert seen[0] != mine.data_ptr()
