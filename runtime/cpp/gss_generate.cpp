// gss_generate: greedy text generation from a gss-export model with libtorch, no Python at run time.
//
//   gss_generate MODEL --prompt-ids 1,2,3 --max-new-tokens N [--threads T] [--full-recompute]
//
// MODEL is a gss-export folder, its model.pt (--format torchscript) or its model.pt2 (--format aoti,
// an AOTInductor package); a folder holding both runs model.pt2. Any of the three families:
// GatedDsConvLM ("dsconv"), GatedStateSpacesLM ("gss"), GatedExponentialSmoothingLM ("mhesa"). Prints
// one JSON line: {"tokens": [...], ...} with the generated ids only. Decoding is incremental: both
// formats carry a `step` (the TorchScript method, the package's second model) that takes the new
// tokens and the per-layer state, so a token costs one position's work plus one read of the state.
// dsconv's state grows ("append": conv inputs and kernel values of every slot so far; step returns
// the new entries, which go into buffers sized for the whole run). gss's and mhesa's is a fixed-size
// recurrence ("replace": step returns the whole new state), so only --full-recompute is bounded by
// max_seq_len. A prompt of more than 128 tokens goes through `prefill` instead (same interface; its
// convolution runs the full-sequence form, the cost of one forward of the prompt).
// TorchScript files exported before `step` existed fall back to a full forward per token, those
// before `prefill` to the prompt in chunks through `step`.
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <CLI/CLI.hpp>

#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Tensors = std::vector<torch::Tensor>;

// Bad input the user can fix: printed as one line, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// longer prompts go through prefill unless the export names its family's own threshold (prefill_above)
constexpr int64_t kPrefillAbove = 128;
constexpr const char* kPastLayout = "u_head_major";  // config.json's past_layout for a head-major appended past (decoder_io.py)
constexpr int64_t kPrefillChunk = 256;  // without prefill: keeps each chunk's (t, context + t) kernel taps cache-sized
// as gss_runtime.decoder's headroom: a step multiplies u's whole buffer, and untouched room costs about what
// filled slots do, so the room past the filled slots is at most an eighth of them (at least kRoomMin)
constexpr int64_t kRoomMin = 256;
constexpr int64_t kRoomShare = 8;

int64_t headroom(int64_t slots, int64_t wanted) {  // free slots to keep past `slots` for `wanted` tokens to come
  return std::min(std::max<int64_t>(wanted, 0), std::max(kRoomMin, slots / kRoomShare));
}

// A loaded model behind one interface. step's and prefill's inputs and outputs are flat, in the ONNX
// decoder's order: "append" (input_ids, pad, past_u.0.., past_k.0..) -> (logits, new_u.0.., new_k.0..);
// "replace" (input_ids, pad, state.0..) -> (logits, new_state.0..).
struct Model {
  std::string format, family, state;  // state: "append" or "replace"
  int64_t num_tokens = 0, max_seq_len = 0, depth = 0, heads = 0, dim_dsconv = 0;
  std::vector<int64_t> state_shape;  // "replace": one layer's state without the batch axis
  int64_t prefill_above = kPrefillAbove;  // prompts of more tokens go through prefill
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  std::function<Tensors(const Tensors&)> step;     // empty when the file has no step
  std::function<Tensors(const Tensors&)> prefill;  // empty when the file has no prefill
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// An integer field of a flat JSON text, or `fallback` (the exports' JSON is written by Python's json module).
int64_t json_int(const std::string& text, const std::string& key, int64_t fallback) {
  auto at = text.find("\"" + key + "\": ");
  return at == std::string::npos ? fallback : std::stoll(text.substr(at + key.size() + 4));
}

Model load_torchscript(const fs::path& path) {
  auto module = std::make_shared<torch::jit::Module>();
  torch::jit::ExtraFilesMap extra{{"config.json", ""}};
  try {
    *module = torch::jit::load(path.string(), torch::kCPU, extra);
  } catch (const c10::Error&) {
    throw UsageError(path.string() + " is not a TorchScript file (export one with gss-export --format torchscript)");
  }
  module->eval();
  Model m;
  m.format = "torchscript";
  m.prefill_above = json_int(extra["config.json"], "prefill_above", kPrefillAbove);
  // the family from its mixer's parameters (upstream's names, fixed by the checkpoints), as intake
  // tells it from the keys: one such parameter per layer
  const std::vector<std::pair<std::string, std::string>> mixers{
      {"dsconv", ".dsconv.to_weight.weight"}, {"gss", ".dss.C_real"}, {"mhesa", ".mhesa.alphas"}};
  for (const auto& p : module->named_parameters()) {
    if (p.name == "to_logits.weight") m.num_tokens = p.value.size(0);
    for (const auto& [family, suffix] : mixers) {
      if (!ends_with(p.name, suffix) || (!m.family.empty() && m.family != family)) continue;
      m.family = family;
      m.depth += 1;
      if (family == "dsconv") {  // to_weight: (heads, dim_dsconv)
        m.heads = p.value.size(0);
        m.dim_dsconv = p.value.size(1);
      }
    }
  }
  if (m.num_tokens == 0 || m.depth == 0 || !module->hasattr("max_seq_len"))
    throw UsageError(path.string() + " is not a gss-export GatedDsConvLM, GatedStateSpacesLM or GatedExponentialSmoothingLM "
                     "(no to_logits, mixer layers or max_seq_len)");
  m.state = m.family == "dsconv" ? "append" : "replace";
  if (m.state == "append" && extra["config.json"].find("\"past_layout\": \"" + std::string(kPastLayout) + "\"") == std::string::npos)
    throw UsageError(path.string() + " was exported before the decoder's past became head-major; re-export it with gss-export --format torchscript");
  m.max_seq_len = module->attr("max_seq_len").toInt();
  m.forward = [module](const torch::Tensor& ids) { return module->forward({ids}).toTensor(); };
  const auto depth = m.depth;
  const bool append = m.state == "append";
  if (!append && module->find_method("empty_state"))  // the recurrent state's shape, as the weights size it
    m.state_shape = module->run_method("empty_state", int64_t{1}).toTensorVector().at(0).sizes().slice(1).vec();
  auto method = [module, depth, append](const std::string& name) -> std::function<Tensors(const Tensors&)> {
    if (!module->find_method(name)) return {};
    if (!append)
      return [module, name](const Tensors& in) {  // step(input_ids, pad, state) -> (logits, new_state)
        auto out = module->run_method(name, in[0], in[1], c10::List<torch::Tensor>(Tensors(in.begin() + 2, in.end()))).toTuple();
        Tensors flat{out->elements()[0].toTensor()};
        for (const auto& t : out->elements()[1].toTensorVector()) flat.push_back(t);
        return flat;
      };
    return [module, depth, name](const Tensors& in) {
      c10::List<torch::Tensor> u(Tensors(in.begin() + 2, in.begin() + 2 + depth)), k(Tensors(in.begin() + 2 + depth, in.end()));
      auto out = module->run_method(name, in[0], in[1], u, k).toTuple();
      Tensors flat{out->elements()[0].toTensor()};
      for (int half = 1; half <= 2; ++half)
        for (const auto& t : out->elements()[half].toTensorVector()) flat.push_back(t);
      return flat;
    };
  };
  if (append || !m.state_shape.empty()) {  // without empty_state there is no state to start from: full recompute
    m.step = method("step");
    m.prefill = method("prefill");
  }
  return m;
}

Model load_aoti(const fs::path& path) {
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> forward, step;
  try {
    forward = std::make_shared<torch::inductor::AOTIModelPackageLoader>(path.string(), "model");
    step = std::make_shared<torch::inductor::AOTIModelPackageLoader>(path.string(), "step");
  } catch (const std::exception&) {
    throw UsageError(path.string() + " is not a gss-export AOTInductor package (export one with gss-export --format aoti; "
                     "a --format pt2 archive runs only in Python)");
  }
  auto meta = forward->get_metadata();
  auto text = [&](const std::string& key) {
    if (!meta.count(key)) throw UsageError(path.string() + " lacks the gss-export metadata " + key + " (re-export with gss-export --format aoti)");
    return meta.at(key);
  };
  auto size = [&](const std::string& key) { return std::stoll(text(key)); };
  Model m;
  m.format = "aoti";
  // packages exported before the other families existed are dsconv and say neither
  m.family = meta.count("family") ? meta.at("family") : "dsconv";
  m.state = meta.count("state") ? meta.at("state") : "append";
  m.num_tokens = size("num_tokens");
  m.max_seq_len = size("max_seq_len");
  m.depth = size("depth");
  m.prefill_above = meta.count("prefill_above") ? size("prefill_above") : kPrefillAbove;
  if (m.state == "append") {
    if (!meta.count("past_layout") || meta.at("past_layout") != kPastLayout)
      throw UsageError(path.string() + " was exported before the decoder's past became head-major; re-export it with gss-export --format aoti");
    m.heads = size("heads");
    m.dim_dsconv = size("dim_dsconv");
  } else if (m.state == "replace") {
    std::istringstream dims(text("state_shape"));
    for (std::string d; std::getline(dims, d, ',');) m.state_shape.push_back(std::stoll(d));
  } else {
    throw UsageError(path.string() + " carries a decoder state of kind " + m.state + ", unknown to this gss_generate (rebuild it)");
  }
  m.forward = [forward](const torch::Tensor& ids) { return forward->run({ids})[0]; };
  m.step = [step](const Tensors& in) { return step->run(in); };
  try {  // packages exported before prefill existed have only model and step
    auto prefill = std::make_shared<torch::inductor::AOTIModelPackageLoader>(path.string(), "prefill");
    m.prefill = [prefill](const Tensors& in) { return prefill->run(in); };
  } catch (const std::exception&) {
  }
  return m;
}

Model load_model(fs::path path) {
  if (fs::is_directory(path)) path /= fs::exists(path / "model.pt2") ? "model.pt2" : "model.pt";
  if (!fs::is_regular_file(path))
    throw UsageError("no such model: " + path.string() + " (export one with gss-export CKPT --format torchscript or aoti)");
  return path.extension() == ".pt2" ? load_aoti(path) : load_torchscript(path);
}

torch::Tensor ids_tensor(const std::vector<int64_t>& ids) {
  return torch::tensor(ids, torch::kInt64).unsqueeze(0);  // (1, t)
}

int64_t argmax_last(const torch::Tensor& logits) {  // logits (1, t, num_tokens); ties -> lowest id
  return logits.select(1, logits.size(1) - 1).argmax(-1).item<int64_t>();
}

// The decoder's state for one row. "append": buffers with room for headroom() more slots, u head-major (1, heads,
// capacity, head_dim), k slot-major (capacity, 1, heads), `filled` slots in use; slot 0 is padding
// (pad = 1 says position 0 is slot 1): the exported steps take a past of at least one slot. u goes in
// whole (its room is zeros, never read into a result: the step reads the buffer as it lies), k as a
// view of its filled slots, which tells the step the context. "replace": one (1, *state_shape) tensor per layer, zeros
// to start, swapped for the step's output (pad = 0: no leading padding in a single row).
class Decoder {
 public:
  Decoder(const Model& m, int64_t capacity)
      : step_(m.step), prefill_(m.prefill), replace_(m.state == "replace"), pad_(torch::full({1}, replace_ ? 0 : 1, torch::kInt64)),
        max_slots_(m.max_seq_len + 1) {
    if (replace_) {
      std::vector<int64_t> shape{1};
      shape.insert(shape.end(), m.state_shape.begin(), m.state_shape.end());
      for (int64_t i = 0; i < m.depth; ++i) state_.push_back(torch::zeros(shape));
      return;
    }
    depth_ = m.depth;
    for (int64_t i = 0; i < m.depth; ++i) state_.push_back(torch::zeros({1, m.heads, capacity + 1, m.dim_dsconv / m.heads}));
    for (int64_t i = 0; i < m.depth; ++i) state_.push_back(torch::zeros({capacity + 1, 1, m.heads}));
  }

  bool has_prefill() const { return static_cast<bool>(prefill_); }

  // ids for the next positions -> logits (1, t, num_tokens); the state moves past them. whole:
  // through prefill (same results, full-sequence cost) instead of step.
  torch::Tensor feed(const std::vector<int64_t>& ids, bool whole = false) {
    const auto t = static_cast<int64_t>(ids.size());
    if (!replace_ && filled_ + t > state_[depth_].size(0))  // the room ran out: grow by headroom
      grow(std::min(filled_ + t + headroom(filled_ + t, max_slots_), max_slots_));
    Tensors in{ids_tensor(ids), pad_};
    for (size_t i = 0; i < state_.size(); ++i)  // u whole, k's filled slots as a view: no copy
      in.push_back(replace_ || static_cast<int64_t>(i) < depth_ ? state_[i] : state_[i].narrow(0, 0, filled_));
    auto out = whole ? prefill_(in) : step_(in);
    if (replace_) {
      state_.assign(out.begin() + 1, out.end());
      return out[0];
    }
    for (size_t i = 0; i < state_.size(); ++i) {
      if (static_cast<int64_t>(i) < depth_) {  // new u entries (t, 1, heads * d) -> slots filled_.. of (1, heads, capacity, d)
        auto& u = state_[i];
        u.narrow(2, filled_, t).copy_(out[i + 1].reshape({t, 1, u.size(1), u.size(3)}).permute({1, 2, 0, 3}));
      } else {
        state_[i].narrow(0, filled_, t).copy_(out[i + 1]);
      }
    }
    filled_ += t;
    return out[0];
  }

 private:
  void grow(int64_t capacity) {  // new zeroed buffers of `capacity` slots holding the filled ones (u's slot axis is 2, k's 0)
    for (size_t i = 0; i < state_.size(); ++i) {
      const int64_t axis = static_cast<int64_t>(i) < depth_ ? 2 : 0;
      auto sizes = state_[i].sizes().vec();
      sizes[axis] = capacity;
      auto grown = torch::zeros(sizes);
      grown.narrow(axis, 0, filled_).copy_(state_[i].narrow(axis, 0, filled_));
      state_[i] = grown;
    }
  }

  std::function<Tensors(const Tensors&)> step_, prefill_;
  bool replace_;
  torch::Tensor pad_;
  Tensors state_;
  int64_t filled_ = 1;
  int64_t depth_ = 0;  // "append": state_ holds depth_ u buffers, then depth_ k buffers
  int64_t max_slots_;  // the padding slot and max_seq_len
};

// How the prompt went in: "prefill" (one call; pieces for a recurrent prompt longer than max_seq_len),
// "step" (chunks through step) or "forward" (full recompute).
std::vector<int64_t> generate_incremental(const Model& m, const std::vector<int64_t>& prompt, int64_t max_new, std::string& how) {
  // room for the prompt and up to headroom() of the tokens after it; the buffers grow by as much when it runs out
  const auto prompt_slots = static_cast<int64_t>(prompt.size());
  Decoder decoder(m, m.state == "append" ? prompt_slots + headroom(prompt_slots + 1, max_new) : 0);
  torch::Tensor logits;
  const auto n = static_cast<int64_t>(prompt.size());
  how = decoder.has_prefill() && n > m.prefill_above ? "prefill" : "step";
  // a call takes at most max_seq_len tokens; check_prompt lets a longer prompt through only for a
  // recurrent state, which carries over from piece to piece
  const auto chunk = std::min(how == "prefill" ? n : kPrefillChunk, m.max_seq_len);
  for (int64_t start = 0; start < n; start += chunk) {
    auto end = std::min(n, start + chunk);
    logits = decoder.feed({prompt.begin() + start, prompt.begin() + end}, how == "prefill");
  }
  std::vector<int64_t> tokens{argmax_last(logits)};
  while (static_cast<int64_t>(tokens.size()) < max_new) tokens.push_back(argmax_last(decoder.feed({tokens.back()})));
  return tokens;
}

std::vector<int64_t> generate_full(const Model& m, std::vector<int64_t> sequence, int64_t max_new) {
  std::vector<int64_t> tokens;
  for (int64_t i = 0; i < max_new; ++i) {
    tokens.push_back(argmax_last(m.forward(ids_tensor(sequence))));
    sequence.push_back(tokens.back());
  }
  return tokens;
}

// incremental: whether the run decodes with step (a recurrent state bounds only each call, not the sequence)
void check_prompt(const Model& m, const std::vector<int64_t>& prompt, int64_t max_new, bool incremental) {
  if (prompt.empty()) throw UsageError("--prompt-ids is empty: give at least one token id");
  for (auto id : prompt)
    if (id < 0 || id >= m.num_tokens)
      throw UsageError("token id " + std::to_string(id) + " is out of range: ids are 0.." + std::to_string(m.num_tokens - 1));
  if (incremental && m.state == "replace") return;
  if (static_cast<int64_t>(prompt.size()) + max_new > m.max_seq_len)
    throw UsageError(std::to_string(prompt.size()) + " prompt tokens + " + std::to_string(max_new) +
                     " new tokens exceed the model's max_seq_len " + std::to_string(m.max_seq_len) +
                     (m.state == "replace" ? " (a limit of --full-recompute only: incremental decoding of " + m.family + " has none)" : ""));
}

std::string to_json(const std::vector<int64_t>& tokens, const Model& m, bool incremental, const std::string& prompt) {
  std::ostringstream out;
  out << "{\"tokens\": [";
  for (size_t i = 0; i < tokens.size(); ++i) out << (i ? ", " : "") << tokens[i];
  out << "], \"format\": \"" << m.format << "\", \"decoding\": \"" << (incremental ? "incremental" : "full-recompute")
      << "\", \"prompt\": \"" << prompt << "\", \"family\": \"" << m.family << "\"}";
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Greedy generation from a gss-export model: TorchScript (model.pt) or AOTInductor (model.pt2)", "gss_generate"};
  std::string model_path;
  std::vector<int64_t> prompt;
  int64_t max_new = 0;
  int threads = 0;
  bool full = false;
  app.add_option("MODEL", model_path, "gss-export folder, model.pt or model.pt2")->required();
  app.add_option("--prompt-ids", prompt, "prompt token ids, comma-separated: 1,2,3")->required()->delimiter(',');
  app.add_option("--max-new-tokens", max_new, "tokens to generate")->required()->check(CLI::Range(1, 1 << 24));
  app.add_option("--threads", threads, "intra-op threads (default: torch's)")->check(CLI::Range(1, 1024));
  app.add_flag("--full-recompute", full, "run the whole sequence per token instead of the step");
  CLI11_PARSE(app, argc, argv);  // prints a one-line message and exits non-zero on bad arguments

  try {
    if (threads > 0) at::set_num_threads(threads);
    torch::NoGradGuard no_grad;
    Model model = load_model(model_path);
    bool incremental = model.step && !full;
    check_prompt(model, prompt, max_new, incremental);
    std::string how = "forward";
    auto tokens = incremental ? generate_incremental(model, prompt, max_new, how) : generate_full(model, prompt, max_new);
    std::cout << to_json(tokens, model, incremental, how) << std::endl;
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
