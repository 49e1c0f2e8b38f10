// CPU kernels for the passes group batch norm adds to per-replica BN.
//
// Inputs are [..., C] with channels innermost (NHWC); every kernel reads them
// as rows of C values, splits the rows among the intra-op threads and
// accumulates in float32 (float64 across blocks of rows), whatever the input
// type. See group_norm_kernels.py for why they exist.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace megdet_tf {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::register_kernel::Name;
using ::tensorflow::shape_inference::InferenceContext;

constexpr int64_t kRowsPerBlock = 256;  // Float32 partial sums, then float64.

// Per-channel vectors of the input's channel count.
absl::Status ChannelVectors(InferenceContext* c, int num_outputs) {
  for (int i = 0; i < num_outputs; ++i) {
    c->set_output(i, c->Vector(c->Dim(c->input(0), -1)));
  }
  return absl::OkStatus();
}

REGISTER_OP("MegdetChannelMoments")
    .Input("x: T")
    .Output("mean: float")
    .Output("m2: float")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) { return ChannelVectors(c, 2); })
    .Doc("Per-channel mean and sum of squared deviations from it.");

REGISTER_OP("MegdetChannelGradSums")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: float")
    .Output("sum_dy: float")
    .Output("sum_dy_centered: float")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) { return ChannelVectors(c, 2); })
    .Doc("Per-channel sums of dy and of dy * (x - mean).");

REGISTER_OP("MegdetGroupNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: float")
    .Input("dy_scale: float")
    .Input("centered_scale: float")
    .Input("offset: float")
    .Output("dx: T")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("dx = dy_scale * dy + centered_scale * (x - mean) + offset.");

struct Rows {
  int64_t count;
  int64_t channels;
};

Rows RowsOf(const Tensor& t) {
  const int64_t channels = t.dims() ? t.dim_size(t.dims() - 1) : 1;
  return {channels ? t.NumElements() / channels : 0, channels};
}

// Checks the inputs of the gradient ops (dy and x of one shape, then
// `num_vectors` per-channel vectors) and sets `rows` to x's.
absl::Status CheckGradInputs(OpKernelContext* ctx, int num_vectors,
                             Rows* rows) {
  if (ctx->input(0).shape() != ctx->input(1).shape()) {
    return absl::InvalidArgumentError("dy and x shapes differ");
  }
  *rows = RowsOf(ctx->input(1));
  for (int i = 2; i < 2 + num_vectors; ++i) {
    if (ctx->input(i).NumElements() != rows->channels) {
      return absl::InvalidArgumentError("per-channel inputs need C values");
    }
  }
  return absl::OkStatus();
}

// Calls accumulate(first_row, end_row, float* sums) on blocks of rows, split
// among the intra-op threads; returns the float64 total of each of the
// `width` sums.
template <typename Accumulate>
std::vector<double> SumRows(OpKernelContext* ctx, const Rows& rows, int width,
                            Accumulate accumulate) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t num_blocks = (rows.count + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t num_shards =
      std::max<int64_t>(1, std::min<int64_t>(workers->NumThreads(), num_blocks));
  const int64_t size = width * rows.channels;
  std::vector<std::vector<double>> partials(num_shards,
                                            std::vector<double>(size, 0.0));
  // One task per shard: the cost estimate only has to exceed the split cost.
  workers->ParallelFor(num_shards, /*cost_per_unit=*/1 << 30,
                       [&](int64_t first, int64_t end) {
    std::vector<float> block(size);
    for (int64_t shard = first; shard < end; ++shard) {
      for (int64_t b = shard; b < num_blocks; b += num_shards) {
        std::fill(block.begin(), block.end(), 0.0f);
        const int64_t begin = b * kRowsPerBlock;
        accumulate(begin, std::min(rows.count, begin + kRowsPerBlock),
                   block.data());
        for (int64_t i = 0; i < size; ++i) partials[shard][i] += block[i];
      }
    }
  });
  std::vector<double> total(size, 0.0);
  for (const auto& partial : partials) {
    for (int64_t i = 0; i < size; ++i) total[i] += partial[i];
  }
  return total;
}

template <typename T>
class ChannelMomentsOp : public OpKernel {
 public:
  explicit ChannelMomentsOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Rows rows = RowsOf(x);
    const int64_t channels = rows.channels;
    Tensor* mean_out;
    Tensor* m2_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {channels}, &mean_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {channels}, &m2_out));
    const T* data = x.flat<T>().data();
    // Two passes, the mean first, so that nothing cancels at a large mean.
    const std::vector<double> sums = SumRows(
        ctx, rows, 1, [&](int64_t begin, int64_t end, float* sum) {
          for (int64_t r = begin; r < end; ++r) {
            const T* row = data + r * channels;
            for (int64_t c = 0; c < channels; ++c) {
              sum[c] += static_cast<float>(row[c]);
            }
          }
        });
    float* mean = mean_out->flat<float>().data();
    for (int64_t c = 0; c < channels; ++c) {
      mean[c] = rows.count ? sums[c] / rows.count : 0.0f;
    }
    const std::vector<double> squares = SumRows(
        ctx, rows, 1, [&](int64_t begin, int64_t end, float* sum) {
          for (int64_t r = begin; r < end; ++r) {
            const T* row = data + r * channels;
            for (int64_t c = 0; c < channels; ++c) {
              const float centered = static_cast<float>(row[c]) - mean[c];
              sum[c] += centered * centered;
            }
          }
        });
    float* m2 = m2_out->flat<float>().data();
    for (int64_t c = 0; c < channels; ++c) m2[c] = squares[c];
  }
};

template <typename T>
class ChannelGradSumsOp : public OpKernel {
 public:
  explicit ChannelGradSumsOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    Rows rows;
    OP_REQUIRES_OK(ctx, CheckGradInputs(ctx, 1, &rows));
    const int64_t channels = rows.channels;
    const T* dy_data = ctx->input(0).flat<T>().data();
    const T* x_data = ctx->input(1).flat<T>().data();
    const float* mean = ctx->input(2).flat<float>().data();
    const std::vector<double> sums = SumRows(
        ctx, rows, 2, [&](int64_t begin, int64_t end, float* sum) {
          float* centered_sum = sum + channels;
          for (int64_t r = begin; r < end; ++r) {
            const T* dy_row = dy_data + r * channels;
            const T* x_row = x_data + r * channels;
            for (int64_t c = 0; c < channels; ++c) {
              const float g = static_cast<float>(dy_row[c]);
              sum[c] += g;
              centered_sum[c] += g * (static_cast<float>(x_row[c]) - mean[c]);
            }
          }
        });
    for (int i = 0; i < 2; ++i) {
      Tensor* out;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(i, {channels}, &out));
      std::copy(sums.begin() + i * channels, sums.begin() + (i + 1) * channels,
                out->flat<float>().data());
    }
  }
};

template <typename T>
class GroupNormGradOp : public OpKernel {
 public:
  explicit GroupNormGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    Rows rows;
    OP_REQUIRES_OK(ctx, CheckGradInputs(ctx, 4, &rows));
    const int64_t channels = rows.channels;
    const Tensor& dy = ctx->input(0);
    const float* mean = ctx->input(2).flat<float>().data();
    const float* dy_scale = ctx->input(3).flat<float>().data();
    const float* centered_scale = ctx->input(4).flat<float>().data();
    const float* offset = ctx->input(5).flat<float>().data();
    Tensor* dx;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dy.shape(), &dx));
    const T* dy_data = dy.flat<T>().data();
    const T* x_data = ctx->input(1).flat<T>().data();
    T* dx_data = dx->flat<T>().data();
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(
        rows.count, /*cost_per_unit=*/channels * 8, [&](int64_t begin,
                                                        int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const T* dy_row = dy_data + r * channels;
            const T* x_row = x_data + r * channels;
            T* dx_row = dx_data + r * channels;
            for (int64_t c = 0; c < channels; ++c) {
              dx_row[c] = static_cast<T>(
                  dy_scale[c] * static_cast<float>(dy_row[c]) +
                  centered_scale[c] *
                      (static_cast<float>(x_row[c]) - mean[c]) +
                  offset[c]);
            }
          }
        });
  }
};

#define REGISTER_CPU(T)                                                    \
  REGISTER_KERNEL_BUILDER(Name("MegdetChannelMoments")                     \
                              .Device(::tensorflow::DEVICE_CPU)            \
                              .TypeConstraint<T>("T"),                     \
                          ChannelMomentsOp<T>);                            \
  REGISTER_KERNEL_BUILDER(Name("MegdetChannelGradSums")                    \
                              .Device(::tensorflow::DEVICE_CPU)            \
                              .TypeConstraint<T>("T"),                     \
                          ChannelGradSumsOp<T>);                           \
  REGISTER_KERNEL_BUILDER(Name("MegdetGroupNormGrad")                      \
                              .Device(::tensorflow::DEVICE_CPU)            \
                              .TypeConstraint<T>("T"),                     \
                          GroupNormGradOp<T>);

REGISTER_CPU(float)
REGISTER_CPU(Eigen::bfloat16)
REGISTER_CPU(Eigen::half)

}  // namespace
}  // namespace megdet_tf
