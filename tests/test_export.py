"""A fused model, built in or converted, exports in eval mode: torch.export
keeps the op, ExportedProgram.run_decompositions(export_decompositions())
turns it into standard aten ops, and ONNX then holds only standard
operators, whose reference evaluator gives the model's output."""
import pytest
import torch

from conftest import assert_close
from fused_preact import PreActResNet, convert
from fused_preact.ops.export import export_decompositions

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_densenet():
    torchvision = pytest.importorskip("torchvision", reason="a test dependency: pip install -r requirements-test.txt")
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5)


def _dilated_and_depthwise():
    from torch import nn

    return nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=2, dilation=2, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))


MODELS = {
    "built in: PreActResNet-20": (lambda: PreActResNet(20), (2, 3, 16, 16)),
    "built in: PreActResNet-11 bottleneck": (lambda: PreActResNet(11), (2, 3, 16, 16)),
    "converted: torchvision DenseNet": (lambda: convert(_small_densenet()), (2, 3, 16, 16)),
    "converted: dilated and depthwise convs": (lambda: convert(_dilated_and_depthwise()), (2, 4, 9, 9)),
}


def _targets(program) -> set:
    return {str(n.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
            for n in gm.graph.nodes if n.op == "call_function"}


def _trained(make, shape):
    """The model after a training step (running statistics of its own), in eval mode, and an input."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    model(x).sum().backward()
    return model.eval(), torch.randn(shape)


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_keeps_the_op_and_decomposes_it_to_aten(name):
    model, x = _trained(*MODELS[name])
    program = torch.export.export(model, (x,))
    assert "fused_preact.bn_relu_conv2d.default" in _targets(program)
    with torch.no_grad():
        want = model(x)
        assert_close(program.module()(x), want, torch.float32, "exported", scale=float(want.abs().max()))
        decomposed = program.run_decompositions(export_decompositions())
        assert not any(t.startswith("fused_preact") for t in _targets(decomposed)), _targets(decomposed)
        assert_close(decomposed.module()(x), want, torch.float32, "decomposed", scale=float(want.abs().max()))


@pytest.mark.parametrize("name", MODELS)
def test_onnx_holds_standard_operators_only_and_computes_the_model(name):
    onnx_reference = pytest.importorskip("onnx.reference", reason="a test dependency: pip install -r "
                                         "requirements-test.txt")
    pytest.importorskip("onnxscript", reason="a test dependency: pip install -r requirements-test.txt")
    model, x = _trained(*MODELS[name])
    program = torch.export.export(model, (x,)).run_decompositions(export_decompositions())
    proto = torch.onnx.export(program, (x,), dynamo=True, verbose=False).model_proto
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, {n.domain for n in proto.graph.node}
    assert {"Conv", "Relu"} <= {node.op_type for node in proto.graph.node}
    out = onnx_reference.ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    assert_close(torch.from_numpy(out), want, torch.float32, "onnx", scale=float(want.abs().max()))


def test_a_training_graph_that_hands_statistics_on_is_refused_in_one_line():
    from fused_preact.ops.export import bn_relu_conv2d_decomposed

    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 1, 1)
    ones, zeros = torch.ones(4), torch.zeros(4)
    with pytest.raises(NotImplementedError, match="export the model in eval mode"):
        bn_relu_conv2d_decomposed(x, [w], None, None, zeros, ones, ones, zeros, None, [1, 1], [0, 0], [1, 1], [1],
                                  True, "reference", 1e-5)
