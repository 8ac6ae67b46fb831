"""Batched crop/flip/normalise against a per-image reference, and the
per-iteration schedule and data order."""
import torch

from fused_preact.train.augment import OFFICIAL_CHANNEL_STATS, Normalizer, random_crop_flip, step_generator
from fused_preact.train.config import resolve
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
    assert s.total_iters == 64000 and s.iters_per_epoch == 390
    assert [s.lr_at(i) for i in (0, 399)] == [0.01, 0.01]
    assert s.lr_at(400) == 0.1 and s.lr_at(31999) == 0.1
    assert abs(s.lr_at(32000) - 0.01) < 1e-12 and abs(s.lr_at(48000) - 0.001) < 1e-12


def test_torch_official_schedule():
    c = resolve("torch-official", {})
    assert (c.batch_size, c.nesterov, c.warmup_iters, c.normalize) == (64, True, 0, "channel")
    s = make_schedule(c, 50000)
    assert s.iters_per_epoch == 781 and s.total_iters == 200 * 781
    # Lua's epoch 81 (1-based) is the first at lr 0.01: after 80 finished epochs.
    assert s.lr_at(80 * 781 - 1) == 0.1 and abs(s.lr_at(80 * 781) - 0.01) < 1e-12
    assert abs(s.lr_at(121 * 781) - 0.001) < 1e-12


def test_shorter_run_keeps_milestone_units():
    s = make_schedule(resolve("torch-official", {"iters": 1000}), 50000)
    assert s.total_iters == 1000 and s.milestones == (80 * 781, 121 * 781)
    s = make_schedule(resolve("paper", {"epochs": 10, "milestones": [5, 8]}), 50000)
    assert s.total_iters == 3900 and s.milestones == (5 * 390, 8 * 390)


def test_batch_order_is_a_function_of_seed_and_epoch():
    a = BatchOrder(7, 100, 10, 10, torch.device("cpu"))
    b = BatchOrder(7, 100, 10, 10, torch.device("cpu"))
    epoch = torch.cat([a.indices(s, slice(0, 10)) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert torch.equal(b.indices(13, slice(0, 10)), a.indices(13, slice(0, 10)))  # b jumps straight to epoch 1
    assert not torch.equal(a.indices(10, slice(0, 10)), epoch[:10])
    assert torch.equal(a.indices(3, slice(5, 10)), epoch[35:40])
