"""Batch augmentation, the official ImageNet transforms, and the sharded loader order."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from slimmable.data import (
    Lighting,
    ShardedSampler,
    TensorImageDataset,
    create_loader,
    crop_flip_batch,
    imagenet_eval_transform,
    imagenet_train_transform,
)


def test_crop_is_a_window_of_the_padded_image() -> None:
    x = torch.randint(1, 255, (8, 3, 6, 6), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = crop_flip_batch(x, padding=2, hflip=False, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(8):
        windows = {(r, c): padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)}
        match = [rc for rc, w in windows.items() if torch.equal(out[i], w)]
        assert match, f"image {i} is not a crop of its padded input"
        offsets.add(match[0])
    assert len(offsets) > 1  # one random offset per image, not per batch


def test_no_padding_no_flip_is_identity_and_flip_mirrors() -> None:
    x = torch.randint(0, 255, (16, 1, 5, 5), dtype=torch.uint8)
    assert torch.equal(crop_flip_batch(x, padding=0, hflip=False), x)
    out = crop_flip_batch(x, padding=0, hflip=True, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(out[i], x[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_lighting() -> None:
    img = torch.full((3, 4, 4), 0.5)
    assert torch.equal(Lighting(0.0)(img), img)
    torch.manual_seed(0)
    out = Lighting(0.1)(img)
    assert out.shape == img.shape and not torch.equal(out, img)
    shift = out - img  # one colour shift for the whole image
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift))
    with pytest.raises(ValueError, match="RGB"):
        Lighting(0.1)(torch.zeros(1, 4, 4))


def test_imagenet_presets() -> None:
    def rrc_scale(tf: T.Compose) -> tuple[float, float]:
        return next(t for t in tf.transforms if isinstance(t, T.RandomResizedCrop)).scale

    assert rrc_scale(imagenet_train_transform(32, "basic")) == (0.08, 1.0)
    assert rrc_scale(imagenet_train_transform(32, "mobile")) == (0.25, 1.0)
    assert rrc_scale(imagenet_train_transform(32, "mobile", crop_scale_min=0.35)) == (0.35, 1.0)
    tf = imagenet_train_transform(32, "basic")
    jitter = next(t for t in tf.transforms if isinstance(t, T.ColorJitter))
    assert jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.6, 1.4)
    assert next(t for t in tf.transforms if isinstance(t, Lighting)).alphastd == 0.1
    img = Image.new("RGB", (50, 40), (120, 30, 200))
    assert tf(img).shape == (3, 32, 32)
    ev = imagenet_eval_transform(224)
    assert ev.transforms[0].size == 256 and ev(img).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="augment 'fancy'"):
        imagenet_train_transform(32, "fancy")


def _dataset(n: int) -> TensorImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorImageDataset(images, torch.arange(n), (0.0,), (1 / 255,))


def test_sharded_batches_union_equals_single_process_batch() -> None:
    ds = _dataset(40)
    one = create_loader(ds, 8, train=True, seed=5)
    two = [create_loader(ds, 8, train=True, seed=5, rank=r, world_size=2) for r in range(2)]
    for loader in [one, *two]:
        loader.batch_sampler.sampler.set_epoch(3)
    single = [y.tolist() for _, y in one]
    shards = [[y.tolist() for _, y in loader] for loader in two]
    assert len(single) == len(shards[0]) == len(shards[1]) == 5
    for i, batch in enumerate(single):
        assert sorted(batch) == sorted(shards[0][i] + shards[1][i])
        assert batch == [v for pair in zip(shards[0][i], shards[1][i]) for v in pair]


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    s = ShardedSampler(30, seed=1)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(0)
    s.set_epoch(2)
    assert list(s) == a and sorted(a) == list(range(30))
    s.set_epoch(3)
    assert list(s) != a
    s.set_epoch(2, start=7)  # resume: skip the first 7 indices of this shard
    assert list(s) == a[7:] and len(s) == 23


def test_eval_shards_cover_every_image_once() -> None:
    ds = _dataset(11)
    seen = []
    for r in range(3):
        for _, y in create_loader(ds, 3, train=False, rank=r, world_size=3):
            seen += y.tolist()
    assert sorted(seen) == list(range(11))
    images, labels = next(iter(create_loader(ds, 4, train=False)))
    assert images.shape == (4, 1, 2, 2) and labels.tolist() == [0, 1, 2, 3]
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # (v/255 - 0) / (1/255)


def test_loader_errors() -> None:
    with pytest.raises(ValueError, match="global batch size 10 is not divisible by 3 processes"):
        create_loader(_dataset(30), 10, train=True, world_size=3)
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        create_loader(_dataset(8), 16, train=True)
