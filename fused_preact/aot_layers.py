"""The layers whose Triton kernels aot.py compiles ahead of time: every
distinct BN-ReLU-conv of the CIFAR nets at the paper's batch, per net, as
(name, input channels, input size, [(K, kernel, stride, padding)], residual)
and, where the layer drops out, its dropout p."""

BATCH = 128


def paper_layers():
    """(name, input channels, input size, [(K, kernel, stride, padding)], residual) of every distinct
    BN-ReLU-conv of a CIFAR bottleneck net (ResNet-164, -1001); a stage's first unit runs conv1 and its
    projection as one launch."""
    layers = []
    in_ch, size = 16, 32
    for stage, width in enumerate((16, 32, 64)):
        stride = 1 if stage == 0 else 2
        layers.append((f"s{stage + 1}.first.conv1+proj", in_ch, size,
                       [(width, 1, stride, 0), (4 * width, 1, stride, 0)], False))
        size //= stride
        layers.append((f"s{stage + 1}.conv2", width, size, [(width, 3, 1, 1)], False))
        layers.append((f"s{stage + 1}.conv3", width, size, [(4 * width, 1, 1, 0)], True))
        layers.append((f"s{stage + 1}.inner.conv1", 4 * width, size, [(width, 1, 1, 0)], False))
        in_ch = 4 * width
    return layers


def basic_layers():
    """The same for a CIFAR basic net (ResNet-110, shortcut A): two 3x3 convs
    per unit (the second with the residual), the first of a stage strided."""
    layers, in_ch, size = [], 16, 32
    for stage, width in enumerate((16, 32, 64)):
        if stage:
            layers.append((f"b{stage + 1}.first.conv1", in_ch, size, [(width, 3, 2, 1)], False))
            size //= 2
        layers.append((f"b{stage + 1}.conv", width, size, [(width, 3, 1, 1)], True))
        in_ch = width
    return layers


def dense_layers():
    """The same for a CIFAR DenseNet-BC (growth 12): in each block, a dense
    layer's 1x1 bottleneck reading its input as pieces (24 channels, then
    one of 12 per earlier layer: read in place, never concatenated) and its
    3x3; and a transition's 1x1 of pieces. Input channels given as a tuple
    are pieces."""
    layers = []
    for block, size in enumerate((32, 16, 8)):
        layers.append((f"d{block + 1}.bottleneck", (24, 12, 12, 12), size, [(48, 1, 1, 0)], False))
        layers.append((f"d{block + 1}.conv2", 48, size, [(12, 3, 1, 1)], False))
    layers.append(("t1.transition", (24, 12, 12, 12, 12), 32, [(36, 1, 1, 0)], False))
    return layers


def wide_layers():
    """The same for WRN-28-10 with dropout: each stage's inner 3x3 conv2
    (residual added) drops its input out (a sixth entry, p)."""
    return [(f"w{stage + 1}.conv2", width, size, [(width, 3, 1, 1)], True, 0.3)
            for stage, (width, size) in enumerate(((160, 32), (320, 16), (640, 8)))]


NETS = {"bottleneck": paper_layers, "basic": basic_layers, "dense": dense_layers, "wide": wide_layers}
