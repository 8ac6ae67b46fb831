"""The embedded offline dataset "shapes10": 32x32 colour images of ten shapes,
generated in code from a seed, so the trainer runs anywhere without a download.

Each image is one shape (disc, ring, square, frame, diamond, triangle, plus,
cross, two bars, crescent) at a random position and size, in a random colour,
on a random two-colour gradient background with pixel noise. Colours are drawn
independently of the class and with a minimum contrast to the background, so
colour statistics alone say nothing about the label and the shape is always
visible: a small PreActResNet learns it within a few epochs, a linear model on
pixels does not.

The whole set is a function of (seed, sizes): the same tensors on every
machine (torch's CPU generator), uint8 (N, 3, 32, 32) like CIFAR.
"""
import torch

CLASSES = ("disc", "ring", "square", "frame", "diamond", "triangle", "plus", "cross", "bars", "crescent")
SIZE = 32
# Seeds of the two splits differ so that no test image repeats a train image.
_SPLIT_SEED = {"train": 0, "test": 1}


def _shape_masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(10, N, H, W) boolean masks of every class's shape in the unit frame (u, v)
    (the shape's centre at 0, its half-size 1); each image then keeps the mask
    of its own class. Cheap enough to evaluate all ten for every image."""
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    box = torch.maximum(au, av)
    # Diagonal coordinates for the rotated cross.
    d1, d2 = (u + v).abs() / 2**0.5, (u - v).abs() / 2**0.5
    return torch.stack([
        r <= 1.0,                                                         # disc
        (r <= 1.0) & (r >= 0.55),                                         # ring
        box <= 0.8,                                                       # square
        (box <= 0.9) & (box >= 0.55),                                     # frame
        au + av <= 1.0,                                                   # diamond
        (v <= 0.75) & (2 * au <= v + 1.0),                                # triangle, apex up
        ((au <= 0.28) & (av <= 1.0)) | ((av <= 0.28) & (au <= 1.0)),      # plus
        ((d1 <= 0.22) & (d2 <= 1.0)) | ((d2 <= 0.22) & (d1 <= 1.0)),      # cross (x)
        (au <= 0.95) & ((v - 0.5).abs() <= 0.22) | (au <= 0.95) & ((v + 0.5).abs() <= 0.22),  # two bars
        (r <= 1.0) & ((u - 0.55) ** 2 + (v + 0.1) ** 2 > 0.75**2),        # crescent
    ])


def _contrasting_colour(background: torch.Tensor, gen: torch.Generator, min_distance: float = 0.4) -> torch.Tensor:
    """A random RGB colour per image at least `min_distance` (RGB in [0, 1],
    Euclidean) from that image's mean background colour: redrawn a few times,
    then pushed away along the difference if still too close."""
    n = background.shape[0]
    colour = torch.rand(n, 3, generator=gen)
    for _ in range(4):
        close = (colour - background).norm(dim=1) < min_distance
        colour = torch.where(close[:, None], torch.rand(n, 3, generator=gen), colour)
    diff = colour - background
    dist = diff.norm(dim=1, keepdim=True).clamp_min(1e-3)
    pushed = (background + diff / dist * min_distance).clamp(0, 1)
    still_close = (dist[:, 0] < min_distance)
    # Clamping can undo the push near the cube's faces; the opposite corner is always far.
    fallback = (background < 0.5).float()
    pushed = torch.where(((pushed - background).norm(dim=1) < min_distance)[:, None], fallback, pushed)
    return torch.where(still_close[:, None], pushed, colour)


def _strokes(n: int, xs: torch.Tensor, ys: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, H, W) masks of a segment 5..10 px long, about 2 px thick, anywhere."""
    start = torch.rand(n, 2, generator=gen) * (SIZE - 1)
    angle = 2 * torch.pi * torch.rand(n, generator=gen)
    length = 5.0 + 5.0 * torch.rand(n, generator=gen)
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    px = xs[None] - start[:, 0, None, None]
    py = ys[None] - start[:, 1, None, None]
    along = (px * direction[:, 0, None, None] + py * direction[:, 1, None, None]).clamp(min=0)
    along = torch.minimum(along, length[:, None, None])
    dx = px - along * direction[:, 0, None, None]
    dy = py - along * direction[:, 1, None, None]
    return ((dx * dx + dy * dy) <= 1.0).float()


def make_shapes(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)), balanced classes."""
    if n < 1:
        raise ValueError(f"make_shapes: n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed * 1000 + _SPLIT_SEED[split])
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=gen)]

    # Geometry: half-size 6..12 px, centre kept so the shape stays mostly inside.
    half = 6.0 + 6.0 * torch.rand(n, generator=gen)
    margin = half * 0.6
    cx = margin + (SIZE - 1 - 2 * margin) * torch.rand(n, generator=gen)
    cy = margin + (SIZE - 1 - 2 * margin) * torch.rand(n, generator=gen)
    # A small random rotation so no class is tied to pixel-exact axes.
    angle = (torch.rand(n, generator=gen) - 0.5) * 0.6
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    dx = (xs[None] - cx[:, None, None]) / half[:, None, None]
    dy = (ys[None] - cy[:, None, None]) / half[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    masks = _shape_masks(u, v)
    mask = masks[labels, torch.arange(n)].float()  # (n, H, W)

    # Background: a linear gradient between two random colours, in a random direction.
    c0, c1 = torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen)
    theta = 2 * torch.pi * torch.rand(n, generator=gen)
    t = (torch.cos(theta)[:, None, None] * xs + torch.sin(theta)[:, None, None] * ys) / SIZE
    t = (t - t.amin(dim=(1, 2), keepdim=True)) / (t.amax(dim=(1, 2), keepdim=True) - t.amin(dim=(1, 2), keepdim=True))
    # Blend only part of the way to c1 so the background stays one broad tone the shape can stand out from.
    background = c0[:, :, None, None] + 0.3 * (c1 - c0)[:, :, None, None] * t[:, None]
    mean_background = background.mean(dim=(2, 3))
    colour = _contrasting_colour(mean_background, gen)

    image = background * (1 - mask[:, None]) + colour[:, :, None, None] * mask[:, None]
    # Clutter: a short thick stroke in another random colour, over or under the
    # shape, so that "the only thing that differs from the background" is not
    # the shape.
    stroke = _strokes(n, xs, ys, gen)
    stroke_colour = torch.rand(n, 3, generator=gen)
    on_top = (torch.rand(n, generator=gen) < 0.5)[:, None, None]
    stroke = torch.where(on_top, stroke, stroke * (1 - mask))[:, None]
    image = image * (1 - stroke) + stroke_colour[:, :, None, None] * stroke
    image = image + 0.08 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.to(torch.int64)
