"""The networks nobody here wrote that the convert tests check, and the
check: the converted model trains as the original with the same weights.
Import after pytest.importorskip of torchvision, timm and pytorchcv."""
import copy
import io

import pytorchcv.model_provider as pytorchcv
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import assert_close


class FunctionalWRNBlock(nn.Module):
    """A Wide ResNet block as its authors write it (szagoruyko/wide-residual-networks,
    pytorch/resnet.py): F.batch_norm, F.relu(inplace=True) and F.conv2d on
    tensors looked up by name; bn0's activation feeds conv0 and the 1x1
    projection (fan-out)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.p = nn.ParameterDict()
        for name, c in (("bn0", cin), ("bn1", cout)):
            self.p[f"{name}_weight"] = nn.Parameter(torch.rand(c) + 0.5)
            self.p[f"{name}_bias"] = nn.Parameter(torch.randn(c) / 10)
            self.register_buffer(f"{name}_running_mean", torch.randn(c) / 10)
            self.register_buffer(f"{name}_running_var", torch.rand(c) + 0.5)
        self.p["conv0"] = nn.Parameter(torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5)
        self.p["conv1"] = nn.Parameter(torch.randn(cout, cout, 3, 3) / (9 * cout) ** 0.5)
        self.p["convdim"] = nn.Parameter(torch.randn(cout, cin, 1, 1) / cin ** 0.5)
        self.stride = stride

    def batch_norm(self, x, base):
        return F.batch_norm(x, weight=self.p[f"{base}_weight"], bias=self.p[f"{base}_bias"],
                            running_mean=self.get_buffer(f"{base}_running_mean"),
                            running_var=self.get_buffer(f"{base}_running_var"), training=self.training)

    def forward(self, x):
        o1 = F.relu(self.batch_norm(x, "bn0"), inplace=True)
        y = F.conv2d(o1, self.p["conv0"], stride=self.stride, padding=1)
        o2 = F.relu(self.batch_norm(y, "bn1"), inplace=True)
        z = F.conv2d(o2, self.p["conv1"], stride=1, padding=1)
        return z + F.conv2d(o1, self.p["convdim"], stride=self.stride)


def _pytorchcv(name):
    return lambda: pytorchcv.get_model(name, pretrained=False)


# name: (constructor, input shape, the report's line)
PEERS = {
    "densenet121": (lambda: torchvision.models.densenet121(), (2, 3, 64, 64),
                    "fused 119 of 121 chains; left: features.norm0 (features.pool0 (MaxPool2d) follows, not a "
                    "Conv2d), features.norm5 (adaptive_avg_pool2d follows, not a Conv2d)"),
    "resnetv2_50": (lambda: timm.create_model("resnetv2_50"), (2, 3, 64, 64),
                    "fused 48 of 49 chains; left: norm (head.global_pool.pool (AdaptiveAvgPool2d) follows, not a "
                    "Conv2d)"),
    "wrn16_10_cifar10": (_pytorchcv("wrn16_10_cifar10"), (2, 3, 32, 32), "fused 12 of 13 chains; left: "
                         "features.post_activ.bn (features.final_pool (AvgPool2d) follows, not a Conv2d)"),
    "densenet40_k12_bc_cifar10": (_pytorchcv("densenet40_k12_bc_cifar10"), (2, 3, 32, 32), "fused 38 of 39 chains; "
                                  "left: features.post_activ.bn (features.final_pool (AvgPool2d) follows, not a "
                                  "Conv2d)"),
    "preresnet164bn_cifar10": (_pytorchcv("preresnet164bn_cifar10"), (2, 3, 32, 32), "fused 162 of 163 chains; "
                               "left: features.post_activ.bn (features.final_pool (AvgPool2d) follows, not a "
                               "Conv2d)"),
    "functional_wrn_block": (lambda: FunctionalWRNBlock(8, 16, 2), (2, 8, 9, 9), "fused 2 of 2 chains"),
}


def two_sgd_steps(model, x, steps=2):
    """(outputs, [grads of the last step]) of `steps` training steps with SGD + momentum."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    outs = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(x)
        (out.square().mean() + out.mean()).backward()
        optimizer.step()
        outs.append(out.detach())
    return outs, [p.grad for p in model.parameters()]


def assert_same_training(original, converted, shape, dtype, originals_params, backend_note=""):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=dtype)
    outs, grads = two_sgd_steps(original, x)
    outs_c, grads_c = two_sgd_steps(converted, x)
    for i, (a, b) in enumerate(zip(outs_c, outs)):
        assert_close(a, b, dtype, f"step {i} output{backend_note}", scale=float(b.abs().max()))
    names = [n for n, _ in originals_params]
    for name, a, b in zip(names, grads_c, grads):
        # The stem's gradient went back through every BatchNorm (163 in
        # preresnet164), each summing in its own order: a few 1e-8 relative.
        assert_close(a, b, dtype, f"grad {name}", scale=30 * (float(b.abs().max()) + 1))
    for (name, a), b in zip(converted.named_buffers(), original.buffers()):
        if a.dtype.is_floating_point:
            assert_close(a, b, dtype, name, scale=float(b.abs().max()) + 1)
        else:
            assert torch.equal(a, b), name
    original.eval(), converted.eval()
    with torch.no_grad():
        want = original(x)
        assert_close(converted(x), want, dtype, "eval output", scale=float(want.abs().max()))


def saved_or_copied(model: nn.Module, how: str) -> nn.Module:
    """model after a torch.save / torch.load round trip, or a deepcopy."""
    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
