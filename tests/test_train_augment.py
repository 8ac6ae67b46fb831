"""Batched crop/flip/normalise against a per-image reference, and the
per-iteration schedule and data order."""
import pytest
import torch

from fused_preact.train.augment import OFFICIAL_CHANNEL_STATS, Normalizer, random_crop_flip, step_generator
from fused_preact.train.config import resolve
from fused_preact.train.distributed import Processes
from fused_preact.train.schedule import BatchOrder, make_schedule


def _reference_crop_flip(x, pad, offsets, mirror):
    out = []
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    for i in range(x.shape[0]):  # the per-image loop the batched version replaces
        img = padded[i, :, offsets[i, 0]:offsets[i, 0] + h, offsets[i, 1]:offsets[i, 1] + w]
        out.append(img.flip(-1) if mirror[i] else img)
    return torch.stack(out)


def test_crop_flip_matches_per_image_reference():
    x = torch.randn(9, 3, 8, 10)
    out = random_crop_flip(x, 3, True, step_generator(5, 17, torch.device("cpu")))
    gen = step_generator(5, 17, torch.device("cpu"))  # the same draws, in the same order
    offsets = torch.randint(0, 7, (9, 2), generator=gen)
    mirror = torch.rand(9, generator=gen) < 0.5
    assert 0 < int(mirror.sum()) < 9
    assert torch.equal(out, _reference_crop_flip(x, 3, offsets, mirror))


def test_process_share_sees_the_single_process_augmentation():
    x = torch.randn(8, 3, 6, 6)
    whole = random_crop_flip(x, 2, True, step_generator(0, 3, torch.device("cpu")))
    second_half = random_crop_flip(x[4:], 2, True, step_generator(0, 3, torch.device("cpu")), rows=slice(4, 8))
    assert torch.equal(whole[4:], second_half)


def test_no_augmentation_is_identity():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(random_crop_flip(x, 0, False, step_generator(0, 0, torch.device("cpu"))), x)


def test_normalizers():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    pixel = Normalizer("pixel-mean", images, "shapes10", torch.device("cpu"))(images)
    torch.testing.assert_close(pixel.mean(0), torch.zeros(3, 4, 4), atol=1e-4, rtol=0)
    channel = Normalizer("channel", images, "cifar10", torch.device("cpu"))(images)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in OFFICIAL_CHANNEL_STATS["cifar10"])
    torch.testing.assert_close(channel, (images.float() - mean) / std)
    own = Normalizer("channel", images, "shapes10", torch.device("cpu"))(images)
    torch.testing.assert_close(own.transpose(0, 1).reshape(3, -1).std(1), torch.ones(3), atol=1e-4, rtol=0)


def test_paper_schedule():
    s = make_schedule(resolve("paper", {}), 50000)
    assert s.total_iters == 64000 and s.iters_per_epoch == 391  # 390 batches of 128 and one of 80
    assert [s.lr_at(i) for i in (0, 399)] == [0.01, 0.01]
    assert s.lr_at(400) == 0.1 and s.lr_at(31999) == 0.1
    assert abs(s.lr_at(32000) - 0.01) < 1e-12 and abs(s.lr_at(48000) - 0.001) < 1e-12


def test_torch_official_schedule():
    c = resolve("torch-official", {})
    assert (c.batch_size, c.nesterov, c.warmup_iters, c.normalize) == (64, True, 0, "channel")
    s = make_schedule(c, 50000)
    # dataloader.lua: ceil(50000 / 64) = 782 iterations, the last batch holding 16 images
    assert s.iters_per_epoch == 782 and s.total_iters == 200 * 782 and s.dropped_images == 0
    # Lua's epoch 81 (1-based) is the first at lr 0.01: after 80 finished epochs.
    assert s.lr_at(80 * 782 - 1) == 0.1 and abs(s.lr_at(80 * 782) - 0.01) < 1e-12
    assert abs(s.lr_at(121 * 782 - 1) - 0.01) < 1e-12 and abs(s.lr_at(121 * 782) - 0.001) < 1e-12


def test_shorter_run_keeps_milestone_units():
    s = make_schedule(resolve("torch-official", {"iters": 1000}), 50000)
    assert s.total_iters == 1000 and s.milestones == (80 * 782, 121 * 782)
    s = make_schedule(resolve("paper", {"epochs": 10, "milestones": [5, 8]}), 50000)
    assert s.total_iters == 3910 and s.milestones == (5 * 391, 8 * 391)


def test_a_remainder_too_small_to_split_is_dropped():
    c = resolve("torch-official", {"batch_size": 64})
    assert make_schedule(c, 64 * 10 + 3, processes=1).iters_per_epoch == 11  # 3 images: a batch for one process
    s = make_schedule(c, 64 * 10 + 3, processes=2)  # 2 + 1 images: too few for BatchNorm in one of them
    assert (s.iters_per_epoch, s.dropped_images) == (10, 3)
    assert make_schedule(c, 64 * 10 + 1, processes=1).dropped_images == 1


def test_batch_order_is_a_function_of_seed_and_epoch():
    a = BatchOrder(7, 100, 10, 10, torch.device("cpu"))
    b = BatchOrder(7, 100, 10, 10, torch.device("cpu"))
    epoch = torch.cat([a.indices(s) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert torch.equal(b.indices(13), a.indices(13))  # b jumps straight to epoch 1
    assert not torch.equal(a.indices(10), epoch[:10])
    assert torch.equal(a.indices(3), epoch[30:40])


def test_the_last_batch_of_an_epoch_holds_the_remainder():
    order = BatchOrder(3, 103, 10, 11, torch.device("cpu"))
    sizes = [len(order.indices(s)) for s in range(11)]
    assert sizes == [10] * 10 + [3]
    assert sorted(torch.cat([order.indices(s) for s in range(11)]).tolist()) == list(range(103))
    assert len(order.indices(11)) == 10  # the next epoch starts with a full batch


@pytest.mark.parametrize("batch, world", [(16, 2), (17, 2), (10, 3), (80, 4), (5, 1)])
def test_processes_split_a_batch_into_contiguous_shares(batch, world):
    shares = [Processes(rank, world, torch.device("cpu")).rows(batch) for rank in range(world)]
    assert shares[0].start == 0 and shares[-1].stop == batch
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
    sizes = [s.stop - s.start for s in shares]
    assert max(sizes) - min(sizes) <= 1
