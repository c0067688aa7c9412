// gss_generate: greedy text generation from a gss-export TorchScript model (model.pt) with libtorch.
//
//   gss_generate MODEL --prompt-ids 1,2,3 --max-new-tokens N [--threads T] [--full-recompute]
//
// MODEL is a gss-export folder or its model.pt. Prints one JSON line: {"tokens": [...], ...} with the
// generated ids only. Decoding is incremental: the scripted module's `step` method takes the new
// tokens and the per-layer state (conv inputs and kernel values of every slot so far) and returns the
// new entries, which go into buffers sized for the whole run, so a token costs one position's work
// plus one read of the state. Exports made before `step` existed fall back to a full forward per token.
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <CLI/CLI.hpp>

#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

// Bad input the user can fix: printed as one line, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int64_t kPrefillChunk = 256;  // keeps each chunk's (t, context + t) kernel taps cache-sized

struct Model {
  torch::jit::Module module;
  int64_t num_tokens = 0;
  int64_t max_seq_len = 0;
  bool incremental = false;
};

Model load_model(std::filesystem::path path) {
  if (std::filesystem::is_directory(path)) path /= "model.pt";
  if (!std::filesystem::is_regular_file(path))
    throw UsageError("no such model: " + path.string() + " (export one with gss-export CKPT --format torchscript)");
  Model m;
  try {
    m.module = torch::jit::load(path.string(), torch::kCPU);
  } catch (const c10::Error&) {
    throw UsageError(path.string() + " is not a TorchScript file (export one with gss-export --format torchscript)");
  }
  m.module.eval();
  for (const auto& p : m.module.named_parameters())
    if (p.name == "to_logits.weight") m.num_tokens = p.value.size(0);
  if (m.num_tokens == 0 || !m.module.hasattr("max_seq_len"))
    throw UsageError(path.string() + " is not a gss-export GatedDsConvLM (no to_logits.weight or max_seq_len)");
  m.max_seq_len = m.module.attr("max_seq_len").toInt();
  m.incremental = m.module.find_method("step").has_value() && m.module.find_method("empty_state").has_value();
  return m;
}

torch::Tensor ids_tensor(const std::vector<int64_t>& ids) {
  return torch::tensor(ids, torch::kInt64).unsqueeze(0);  // (1, t)
}

int64_t argmax_last(const torch::Tensor& logits) {  // logits (1, t, num_tokens); ties -> lowest id
  return logits.select(1, logits.size(1) - 1).argmax(-1).item<int64_t>();
}

// Slot-major state buffers (capacity, 1, width) for the whole run; `filled` slots are in use.
class Decoder {
 public:
  Decoder(torch::jit::Module& module, int64_t capacity) : module_(module) {
    auto empty = module_.run_method("empty_state", int64_t{1}).toTuple();
    for (int half = 0; half < 2; ++half)
      for (const torch::Tensor& t : empty->elements()[half].toTensorVector())
        (half == 0 ? u_ : k_).push_back(torch::empty({capacity, 1, t.size(2)}));
  }

  // ids for slots filled..filled+t-1 -> logits (1, t, num_tokens); their entries are appended.
  torch::Tensor feed(const std::vector<int64_t>& ids) {
    auto pad = torch::zeros({1}, torch::kInt64);
    auto out = module_.run_method("step", ids_tensor(ids), pad, filled_part(u_), filled_part(k_)).toTuple();
    const auto t = static_cast<int64_t>(ids.size());
    append(u_, out->elements()[1].toTensorList(), t);
    append(k_, out->elements()[2].toTensorList(), t);
    filled_ += t;
    return out->elements()[0].toTensor();
  }

 private:
  c10::List<torch::Tensor> filled_part(const std::vector<torch::Tensor>& buffers) const {
    c10::List<torch::Tensor> views;
    for (const auto& b : buffers) views.push_back(b.narrow(0, 0, filled_));  // a view, no copy
    return views;
  }
  void append(std::vector<torch::Tensor>& buffers, const c10::List<torch::Tensor>& entries, int64_t t) {
    for (size_t i = 0; i < buffers.size(); ++i) buffers[i].narrow(0, filled_, t).copy_(entries.get(i));
  }

  torch::jit::Module& module_;
  std::vector<torch::Tensor> u_, k_;
  int64_t filled_ = 0;
};

std::vector<int64_t> generate_incremental(Model& m, const std::vector<int64_t>& prompt, int64_t max_new) {
  Decoder decoder(m.module, static_cast<int64_t>(prompt.size()) + max_new);
  torch::Tensor logits;
  for (size_t start = 0; start < prompt.size(); start += kPrefillChunk) {
    auto end = std::min(prompt.size(), start + kPrefillChunk);
    logits = decoder.feed({prompt.begin() + start, prompt.begin() + end});
  }
  std::vector<int64_t> tokens{argmax_last(logits)};
  while (static_cast<int64_t>(tokens.size()) < max_new) tokens.push_back(argmax_last(decoder.feed({tokens.back()})));
  return tokens;
}

std::vector<int64_t> generate_full(Model& m, std::vector<int64_t> sequence, int64_t max_new) {
  std::vector<int64_t> tokens;
  for (int64_t i = 0; i < max_new; ++i) {
    tokens.push_back(argmax_last(m.module.forward({ids_tensor(sequence)}).toTensor()));
    sequence.push_back(tokens.back());
  }
  return tokens;
}

void check_prompt(const Model& m, const std::vector<int64_t>& prompt, int64_t max_new) {
  if (prompt.empty()) throw UsageError("--prompt-ids is empty: give at least one token id");
  for (auto id : prompt)
    if (id < 0 || id >= m.num_tokens)
      throw UsageError("token id " + std::to_string(id) + " is out of range: ids are 0.." + std::to_string(m.num_tokens - 1));
  if (static_cast<int64_t>(prompt.size()) + max_new > m.max_seq_len)
    throw UsageError(std::to_string(prompt.size()) + " prompt tokens + " + std::to_string(max_new) +
                     " new tokens exceed the model's max_seq_len " + std::to_string(m.max_seq_len));
}

std::string to_json(const std::vector<int64_t>& tokens, bool incremental) {
  std::ostringstream out;
  out << "{\"tokens\": [";
  for (size_t i = 0; i < tokens.size(); ++i) out << (i ? ", " : "") << tokens[i];
  out << "], \"decoding\": \"" << (incremental ? "incremental" : "full-recompute") << "\"}";
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Greedy generation from a gss-export TorchScript model (model.pt)", "gss_generate"};
  std::string model_path;
  std::vector<int64_t> prompt;
  int64_t max_new = 0;
  int threads = 0;
  bool full = false;
  app.add_option("MODEL", model_path, "gss-export folder or its model.pt")->required();
  app.add_option("--prompt-ids", prompt, "prompt token ids, comma-separated: 1,2,3")->required()->delimiter(',');
  app.add_option("--max-new-tokens", max_new, "tokens to generate")->required()->check(CLI::Range(1, 1 << 24));
  app.add_option("--threads", threads, "intra-op threads (default: torch's)")->check(CLI::Range(1, 1024));
  app.add_flag("--full-recompute", full, "run the whole sequence per token instead of the step method");
  CLI11_PARSE(app, argc, argv);  // prints a one-line message and exits non-zero on bad arguments

  try {
    if (threads > 0) at::set_num_threads(threads);
    torch::NoGradGuard no_grad;
    Model model = load_model(model_path);
    check_prompt(model, prompt, max_new);
    bool incremental = model.incremental && !full;
    auto tokens = incremental ? generate_incremental(model, prompt, max_new) : generate_full(model, prompt, max_new);
    std::cout << to_json(tokens, incremental) << std::endl;
  } catch (const UsageError& e) {
    std::cerr << "gss_generate: error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {  // c10::Error carries a C++ backtrace: keep its first line only
    std::string what = e.what();
    std::cerr << "gss_generate: error: " << what.substr(0, what.find('\n')) << std::endl;
    return 1;
  }
  return 0;
}
