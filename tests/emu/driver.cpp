// The emulator and our kernels without torch, for the sanitizer builds (tests/test_emu_sanitizers.py
// compiles this with -fsanitize=thread, and with -fsanitize=address,undefined): the self-tests,
// the epilogue kernel and the fused convolution (every tile, split-K, the narrow stem path, the dual)
// against float64 references, blocks spread over several OS threads. Exit code 0: all passed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/kernels/epilogue.h"
#include "cuda/kernels/implicit_gemm.h"
#include "emu/runtime.h"
#include "emu/selftest.h"

using namespace resnet_fused::cuda;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

float h2f(__half h) { return __half2float(h); }

void selftests() {
  for (const auto& name : rf::emu::selftest_names()) {
    const std::string err = rf::emu::run_selftest(name);
    const bool expect_ok = name.rfind("ok_", 0) == 0;
    check(expect_ok == err.empty(), "selftest " + name + (err.empty() ? "" : ": " + err.substr(0, 100)));
  }
}

void epilogue() {
  const int N = 3, C = 24, HW = 20, n = N * C * HW;
  std::mt19937 rng(1);
  std::normal_distribution<float> d;
  std::vector<__half> src(n), res(n), dst(n);
  std::vector<float> bias(C);
  for (int i = 0; i < n; ++i) {
    src[i] = __float2half_rn(d(rng));
    res[i] = __float2half_rn(d(rng));
  }
  for (auto& b : bias) b = d(rng);
  for (int cl = 0; cl < 2; ++cl) {
    EpilogueParams p;
    p.src = src.data();
    p.dst = dst.data();
    p.residual = res.data();
    p.bias = bias.data();
    p.numel = n;
    p.C = C;
    p.HW = HW;
    p.channels_last = cl;
    p.relu = true;
    p.dtype = DType::kHalf;
    rf::emu::Buffers scope({{src.data(), n * sizeof(__half), "src", false},
                            {dst.data(), n * sizeof(__half), "dst", true},
                            {res.data(), n * sizeof(__half), "residual", false},
                            {bias.data(), C * sizeof(float), "bias", false}});
    const bool launched = launch_bias_act_epilogue(p, nullptr) == cudaSuccess;
    double worst = 0;
    for (int i = 0; i < n; ++i) {
      const int c = cl ? i % C : (i / HW) % C;
      double ref = double(h2f(src[i])) + bias[c] + h2f(res[i]);
      ref = ref < 0 ? 0 : ref;
      worst = std::max(worst, std::fabs(ref - h2f(dst[i])) / std::max(1.0, std::fabs(ref)));
    }
    check(launched && worst < 2e-3, std::string("epilogue ") + (cl ? "nhwc" : "nchw") + (launched ? "" : ": " + rf::emu::last_error()));
  }
}

void conv(int N, int C, int K, int R, int stride, int H, int W, int tile, int splits, bool residual) {
  const int pad = R / 2, P = (H + 2 * pad - R) / stride + 1, Q = (W + 2 * pad - R) / stride + 1;
  std::mt19937 rng(N * 1000 + C * 10 + K);
  std::normal_distribution<float> d;
  std::vector<__half> x(size_t(N) * H * W * C), w(size_t(K) * R * R * C), r(size_t(N) * P * Q * K), out(r.size());
  std::vector<float> bias(K);
  for (auto& v : x) v = __float2half_rn(d(rng));
  for (auto& v : w) v = __float2half_rn(d(rng) / std::sqrt(float(C * R * R)));
  for (auto& v : r) v = __float2half_rn(d(rng));
  for (auto& v : bias) v = d(rng);
  ConvParams p;
  p.input = x.data();
  p.weight = w.data();
  p.bias = bias.data();
  p.residual = residual ? r.data() : nullptr;
  p.output = out.data();
  p.N = N;
  p.H = H;
  p.W = W;
  p.C = C;
  p.K = K;
  p.R = p.S = R;
  p.P = P;
  p.Q = Q;
  p.stride_h = p.stride_w = stride;
  p.pad_h = p.pad_w = pad;
  p.relu = true;
  p.dtype = DType::kHalf;
  const ConvPlan plan = plan_conv(p, 132, tile, splits);
  std::vector<float> ws(plan.workspace_bytes / sizeof(float) + 1);
  p.workspace = plan.workspace_bytes ? ws.data() : nullptr;
  std::vector<rf::emu::Buffer> bufs = {{x.data(), x.size() * 2, "input", false},
                                       {w.data(), w.size() * 2, "weight", false},
                                       {bias.data(), bias.size() * 4, "bias", false},
                                       {out.data(), out.size() * 2, "output", true}};
  if (residual) bufs.push_back({r.data(), r.size() * 2, "residual", false});
  if (plan.workspace_bytes) bufs.push_back({ws.data(), plan.workspace_bytes, "workspace", true});
  rf::emu::Buffers scope(bufs);
  const bool launched = launch_conv(p, plan, nullptr) == cudaSuccess;
  double worst = 0;
  for (int n = 0; n < N && launched; ++n)
    for (int pp = 0; pp < P; ++pp)
      for (int q = 0; q < Q; ++q)
        for (int k = 0; k < K; ++k) {
          double acc = bias[k];
          for (int rr = 0; rr < R; ++rr)
            for (int s = 0; s < R; ++s) {
              const int h = pp * stride - pad + rr, ww = q * stride - pad + s;
              if (h < 0 || h >= H || ww < 0 || ww >= W) continue;
              for (int c = 0; c < C; ++c)
                acc += double(h2f(x[((size_t(n) * H + h) * W + ww) * C + c])) *
                       h2f(w[((size_t(k) * R + rr) * R + s) * C + c]);
            }
          const size_t o = ((size_t(n) * P + pp) * Q + q) * K + k;
          if (residual) acc += h2f(r[o]);
          acc = acc < 0 ? 0 : acc;
          worst = std::max(worst, std::fabs(acc - h2f(out[o])) / std::max(1.0, std::fabs(acc)));
        }
  char what[160];
  std::snprintf(what, sizeof(what), "conv N%d C%d K%d %dx%d/s%d %dx%d tile %d splits %d (ran %d, narrow %d)%s", N, C, K,
                R, R, stride, H, W, tile, splits, plan.splits, int(plan.narrow_loads), residual ? " +residual" : "");
  check(launched && worst < 4e-3, std::string(what) + (launched ? "" : ": " + rf::emu::last_error()));
}

// The dual kernel: act(y . w[:, :C1] + x[::s, ::s] . w[:, C1:] + bias), y [N, P, Q, C1], x [N, H2, W2, C2].
void dual(int N, int C1, int C2, int K, int stride, int H2, int W2, int tile, int splits) {
  const int P = (H2 - 1) / stride + 1, Q = (W2 - 1) / stride + 1, C = C1 + C2;
  std::mt19937 rng(N * 1000 + C1 * 10 + K);
  std::normal_distribution<float> d;
  std::vector<__half> y(size_t(N) * P * Q * C1), x(size_t(N) * H2 * W2 * C2), w(size_t(K) * C), out(size_t(N) * P * Q * K);
  std::vector<float> bias(K);
  for (auto& v : y) v = __float2half_rn(d(rng));
  for (auto& v : x) v = __float2half_rn(d(rng));
  for (auto& v : w) v = __float2half_rn(d(rng) / std::sqrt(float(C)));
  for (auto& v : bias) v = d(rng);
  ConvParams p;
  p.input = y.data();
  p.input2 = x.data();
  p.weight = w.data();
  p.bias = bias.data();
  p.output = out.data();
  p.N = N;
  p.H = p.P = P;
  p.W = p.Q = Q;
  p.C = C1;
  p.C2 = C2;
  p.H2 = H2;
  p.W2 = W2;
  p.stride2 = stride;
  p.K = K;
  p.relu = true;
  p.dtype = DType::kHalf;
  const ConvPlan plan = plan_conv(p, 132, tile, splits);
  std::vector<float> ws(plan.workspace_bytes / sizeof(float) + 1);
  p.workspace = plan.workspace_bytes ? ws.data() : nullptr;
  std::vector<rf::emu::Buffer> bufs = {{y.data(), y.size() * 2, "input", false},
                                       {x.data(), x.size() * 2, "input2", false},
                                       {w.data(), w.size() * 2, "weight", false},
                                       {bias.data(), bias.size() * 4, "bias", false},
                                       {out.data(), out.size() * 2, "output", true}};
  if (plan.workspace_bytes) bufs.push_back({ws.data(), plan.workspace_bytes, "workspace", true});
  rf::emu::Buffers scope(bufs);
  const char* why = conv_unsupported(p);
  const bool launched = !why && launch_conv(p, plan, nullptr) == cudaSuccess;
  double worst = 0;
  for (int n = 0; n < N && launched; ++n)
    for (int pp = 0; pp < P; ++pp)
      for (int q = 0; q < Q; ++q)
        for (int k = 0; k < K; ++k) {
          double acc = bias[k];
          for (int c = 0; c < C1; ++c)
            acc += double(h2f(y[((size_t(n) * P + pp) * Q + q) * C1 + c])) * h2f(w[size_t(k) * C + c]);
          for (int c = 0; c < C2; ++c)
            acc += double(h2f(x[((size_t(n) * H2 + pp * stride) * W2 + q * stride) * C2 + c])) *
                   h2f(w[size_t(k) * C + C1 + c]);
          acc = acc < 0 ? 0 : acc;
          const size_t o = ((size_t(n) * P + pp) * Q + q) * K + k;
          worst = std::max(worst, std::fabs(acc - h2f(out[o])) / std::max(1.0, std::fabs(acc)));
        }
  char what[160];
  std::snprintf(what, sizeof(what), "dual N%d C%d+%d K%d s%d %dx%d tile %d splits %d (ran %d)", N, C1, C2, K, stride,
                H2, W2, tile, splits, plan.splits);
  check(launched && worst < 4e-3, std::string(what) + (why ? std::string(": ") + why : launched ? "" : ": " + rf::emu::last_error()));
}

}  // namespace

int main() {
  rf::emu::options().workers = 3;  // blocks on several OS threads: something for TSan to watch
  selftests();
  epilogue();
  conv(2, 40, 72, 3, 1, 5, 9, 0, 1, true);
  conv(2, 40, 72, 3, 1, 5, 9, 1, 3, true);
  conv(2, 64, 64, 3, 2, 7, 7, 2, 2, false);
  conv(1, 4, 64, 7, 2, 13, 11, -1, -1, true);  // 4 channels: the 8-byte loads of the stem
  conv(1, 256, 64, 1, 1, 4, 4, -1, 8, true);
  dual(2, 40, 72, 136, 2, 7, 5, 0, 1);
  dual(1, 64, 128, 64, 2, 5, 5, 1, 3);
  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
