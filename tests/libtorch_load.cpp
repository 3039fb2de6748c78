// What a LibTorch (C++) server does with a TorchScript'd fused model: load resnet_fused's library
// for its ops (torch.ops.resnet_fused.*), torch::jit::load the model, run it. No Python.
//   libtorch_load RESNET_FUSED_SO MODEL.ts INPUT.f32 N C H W OUTPUT.f32
#include <dlfcn.h>
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 9) {
    std::cerr << "usage: libtorch_load RESNET_FUSED_SO MODEL.ts INPUT.f32 N C H W OUTPUT.f32\n";
    return 2;
  }
  // RTLD_LAZY: the library's one Python symbol (its module init) is never called here.
  if (!dlopen(argv[1], RTLD_LAZY | RTLD_GLOBAL)) {
    std::cerr << "dlopen failed: " << dlerror() << "\n";
    return 1;
  }
  std::vector<int64_t> shape = {std::stoll(argv[4]), std::stoll(argv[5]), std::stoll(argv[6]), std::stoll(argv[7])};
  torch::Tensor x = torch::empty(shape, torch::kFloat32);
  std::ifstream in(argv[3], std::ios::binary);
  in.read(reinterpret_cast<char*>(x.data_ptr<float>()), x.numel() * sizeof(float));
  if (!in) {
    std::cerr << "short input file\n";
    return 1;
  }
  torch::jit::Module model = torch::jit::load(argv[2]);
  model.eval();
  torch::InferenceMode guard;
  torch::Tensor y = model.forward({x}).toTensor().contiguous();
  std::ofstream out(argv[8], std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data_ptr<float>()), y.numel() * sizeof(float));
  std::cout << "ok " << y.sizes() << "\n";
  return 0;
}
