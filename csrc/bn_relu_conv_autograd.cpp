// fused_preact::bn_relu_conv: the "native" backend's BN -> ReLU -> conv(s)
// layer as one C++ autograd function, the eager path of
// fused_preact/ops/bn_relu_conv.py for that backend.
//
// Why in C++: a layer of ResNet-1001 at a small batch costs less device work
// than the Python of an autograd.Function costs host time (about 50 us per
// forward + backward on the CPU), and on a GPU that host time is the step.
// Here forward and backward are each one C++ call that dispatches the same
// kernels the Python path does (bn_relu_apply, conv2d, convolution_backward,
// bn_relu_backward, through the dispatcher, so a dispatch mode sees each).
//
// Math, as the Python path: a = relu(x * scale + shift); out_i = conv_i(a)
// (residual added to out_0). Backward recomputes a (or uses the one kept by
// keep_activation), takes each conv's input and weight gradients from
// convolution_backward, sums the input gradients and hands them to
// bn_relu_backward, which gives dx and the sums sum dz (= d beta) and
// sum dz * xhat (= d gamma). mean/invstd/scale/shift are constants to
// autograd: the backward differentiates through them itself.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace fused_preact {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor bn_relu_apply(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_preact::bn_relu_apply", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, scale, shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(const at::Tensor& grad_act, const at::Tensor& x,
                                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                                const at::Tensor& scale, const at::Tensor& shift,
                                                                bool training) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_preact::bn_relu_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(grad_act, x, mean, invstd, scale, shift, training);
}

// Conv i's (stride, padding) from the flat [h0, w0, h1, w1, ...] lists.
at::IntArrayRef pair_at(const std::vector<int64_t>& flat, size_t i) { return at::IntArrayRef(flat).slice(2 * i, 2); }

struct BnReluConv : public torch::autograd::Function<BnReluConv> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                               const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                               const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                               at::IntArrayRef strides, at::IntArrayRef paddings, bool training,
                               bool keep_activation) {
    const at::Tensor a = bn_relu_apply(x, scale, shift);
    std::vector<int64_t> st = strides.vec(), pad = paddings.vec();
    variable_list outs;
    outs.reserve(weights.size());
    for (size_t i = 0; i < weights.size(); ++i) {
      outs.push_back(at::conv2d(a, weights[i], {}, pair_at(st, i), pair_at(pad, i)));
    }
    if (residual.has_value() && residual->defined()) outs[0].add_(*residual);

    // Everything backward needs goes through save_for_backward, so
    // saved_tensors_hooks (and save_on_cpu) see and may offload all of it.
    variable_list saved{x, mean, invstd, scale, shift, bn_weight.value_or(at::Tensor()),
                        bn_bias.value_or(at::Tensor())};
    saved.insert(saved.end(), weights.begin(), weights.end());
    if (keep_activation) saved.push_back(a);
    ctx->save_for_backward(saved);
    ctx->saved_data["strides"] = st;
    ctx->saved_data["paddings"] = pad;
    ctx->saved_data["training"] = training;
    ctx->saved_data["kept"] = keep_activation;
    ctx->saved_data["has_bn_weight"] = bn_weight.has_value() && bn_weight->defined();
    ctx->saved_data["has_bn_bias"] = bn_bias.has_value() && bn_bias->defined();
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    // An unused output's gradient stays undefined: its conv backward is skipped.
    ctx->set_materialize_grads(false);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Autograd enables grad mode in backward only for create_graph=True.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bn_relu_conv2d: double backward (create_graph=True, e.g. a gradient penalty or a Hessian-vector "
                "product) is not supported; build the network with fused=False (plain torch.nn modules) for it");
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &invstd = saved[2], &scale = saved[3], &shift = saved[4];
    const at::Tensor &bn_weight = saved[5], &bn_bias = saved[6];
    const bool kept = ctx->saved_data["kept"].toBool();
    const size_t n = saved.size() - 7 - (kept ? 1 : 0);
    const std::vector<int64_t> st = ctx->saved_data["strides"].toIntVector();
    const std::vector<int64_t> pad = ctx->saved_data["paddings"].toIntVector();
    const bool training = ctx->saved_data["training"].toBool();
    const bool has_w = ctx->saved_data["has_bn_weight"].toBool(), has_b = ctx->saved_data["has_bn_bias"].toBool();
    const bool has_res = ctx->saved_data["has_residual"].toBool();

    // needs_input_grad counts the tensor inputs only, in forward's order:
    // x, the weights, bn_weight and bn_bias where given, mean, invstd, scale,
    // shift, residual where given.
    const size_t w0 = 1, bw = w0 + n, bb = bw + (has_w ? 1 : 0), stats = bb + (has_b ? 1 : 0);
    const bool needs_bn = ctx->needs_input_grad(0) || (has_w && ctx->needs_input_grad(bw)) ||
                          (has_b && ctx->needs_input_grad(bb));
    std::vector<bool> wanted(n);
    bool any_wanted = false;
    for (size_t i = 0; i < n; ++i) {
      wanted[i] = ctx->needs_input_grad(w0 + i) && grads[i].defined();
      any_wanted = any_wanted || wanted[i];
    }
    // The weight gradient needs relu(bn(x)) (kept, or recomputed and freed on
    // return); the input gradient reads only its input's shape.
    const at::Tensor a = !any_wanted ? x : kept ? saved.back() : bn_relu_apply(x, scale, shift);
    at::Tensor grad_act;
    variable_list d_weights(n);
    for (size_t i = 0; i < n; ++i) {
      if (!grads[i].defined()) continue;
      auto [da, dw, db] = at::convolution_backward(grads[i], a, saved[7 + i], std::nullopt, pair_at(st, i),
                                                   pair_at(pad, i), {1, 1}, false, {0, 0}, 1,
                                                   {needs_bn, wanted[i], false});
      if (needs_bn) grad_act = grad_act.defined() ? grad_act + da : da;
      d_weights[i] = dw;
    }
    at::Tensor dx, sum_dz, sum_dz_xhat;
    if (grad_act.defined()) {
      std::tie(dx, sum_dz, sum_dz_xhat) = bn_relu_backward(grad_act, x, mean, invstd, scale, shift, training);
    }

    // One gradient per forward argument (a list: one per element); none for
    // the non-tensor arguments and the absent optionals.
    variable_list out{dx};
    out.insert(out.end(), d_weights.begin(), d_weights.end());
    // d beta = sum dz and d gamma = sum dz * xhat, in training and eval alike.
    out.push_back(has_w && sum_dz_xhat.defined() ? sum_dz_xhat.to(bn_weight.scalar_type()) : at::Tensor());
    out.push_back(has_b && sum_dz.defined() ? sum_dz.to(bn_bias.scalar_type()) : at::Tensor());
    out.insert(out.end(), 4, at::Tensor());  // mean, invstd, scale, shift
    out.push_back(has_res && ctx->needs_input_grad(stats + 4) ? grads[0] : at::Tensor());
    out.insert(out.end(), 4, at::Tensor());  // strides, paddings, training, keep_activation
    return out;
  }
};

std::vector<at::Tensor> bn_relu_conv(const at::Tensor& x, at::TensorList weights,
                                     const std::optional<at::Tensor>& bn_weight,
                                     const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift,
                                     const std::optional<at::Tensor>& residual, at::IntArrayRef strides,
                                     at::IntArrayRef paddings, bool training, bool keep_activation) {
  TORCH_CHECK(!weights.empty() && strides.size() == 2 * weights.size() && paddings.size() == 2 * weights.size(),
              "bn_relu_conv: strides and paddings must hold an (h, w) pair per weight (", weights.size(),
              " weights), got ", strides.size(), " and ", paddings.size(), " values");
  return BnReluConv::apply(x, weights, bn_weight, bn_bias, mean, invstd, scale, shift, residual, strides, paddings,
                           training, keep_activation);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_preact, m) {
  // Eager mode only (the Python path traces the torch.library op instead).
  m.def(
      "bn_relu_conv(Tensor x, Tensor[] weights, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor invstd, "
      "Tensor scale, Tensor shift, Tensor? residual, int[] strides, int[] paddings, bool training, "
      "bool keep_activation) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fused_preact, Autograd, m) { m.impl("bn_relu_conv", &bn_relu_conv); }

}  // namespace fused_preact
