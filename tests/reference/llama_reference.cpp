// Reference generator for Driftwood's correctness tests: runs llama.cpp (C API, CPU) on a GGUF
// model and writes llama.cpp's tokenization, greedy continuation and top-k logits per step.
//
// Built and run by tests/reference/make_reference.sh (not part of CI). Compile against the
// libllama/libggml of a llama.cpp build, with vendor/ of the same tree on the include path
// (for nlohmann/json.hpp):
//
//   g++ -O2 -std=c++17 llama_reference.cpp -I$LLAMA/include -I$LLAMA/ggml/include -I$LLAMA/vendor \
//       -L$BUILD/bin -lllama -lggml -lggml-base -Wl,-rpath,$BUILD/bin -o llama_reference
//
// Usage: llama_reference MODEL.gguf SPEC.json OUT.json N_THREADS PRODUCER
//
// SPEC.json: {"cases": [{"name", "text" | "messages": [{"role","content"}...], "parse_special",
//             "n_predict"}...], "tokenize_only": [{"text", "parse_special"}...]}
//
// Conventions (also stated in the output's "conventions" field):
//  * tokenization: llama_tokenize(add_special = true, i.e. BOS/EOS as the model metadata says,
//    parse_special as given);
//  * greedy: argmax over the raw logits (lowest id wins an exact tie), no sampler, no penalties;
//    stops after n_predict tokens or right after an end-of-generation token (which is included);
//  * steps[i] holds the top-k logits that predicted greedy_ids[i]: steps[0] comes from the prompt
//    batch (logits of the last prompt token), steps[i>0] from feeding greedy_ids[i-1] alone;
//    "pos" is the KV position of the token whose output row these logits are;
//  * chat cases are rendered like the model's Jinja template: if the first message is not a system
//    message, the template's default system message is prepended; then ChatML with
//    add_generation_prompt (llama_chat_apply_template, cross-checked against a hand rendering).
#include "llama.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

using json = nlohmann::ordered_json;

static const int TOP_K = 8;

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool parse_special) {
    int n = -llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0, true, parse_special);
    if (n < 0) n = -n;
    std::vector<llama_token> out(n + 8);
    int got = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), true, parse_special);
    if (got < 0) throw std::runtime_error("tokenize failed");
    out.resize(got);
    return out;
}

static std::string detokenize(const llama_vocab * vocab, const std::vector<llama_token> & ids) {
    std::vector<char> buf(ids.size() * 64 + 64);
    int n = llama_detokenize(vocab, ids.data(), (int32_t) ids.size(), buf.data(), (int32_t) buf.size(),
                             /*remove_special*/ false, /*unparse_special*/ true);
    if (n < 0) {
        buf.resize(-n);
        n = llama_detokenize(vocab, ids.data(), (int32_t) ids.size(), buf.data(), (int32_t) buf.size(), false, true);
    }
    return std::string(buf.data(), n);
}

static double round4(float x) { return std::round((double) x * 10000.0) / 10000.0; }

static std::string default_system_message(const std::string & tmpl) {
    const std::string open = "<|im_start|>system\n";
    size_t a = tmpl.find(open);
    if (a == std::string::npos) return "";
    a += open.size();
    size_t b = tmpl.find("<|im_end|>", a);
    if (b == std::string::npos) return "";
    return tmpl.substr(a, b - a);
}

static std::string render_chat(const char * tmpl, const json & messages, json & messages_used) {
    std::vector<std::pair<std::string, std::string>> msgs;
    for (const auto & m : messages) msgs.emplace_back(m.at("role").get<std::string>(), m.at("content").get<std::string>());
    if (msgs.empty() || msgs[0].first != "system") {
        std::string sys = default_system_message(tmpl);
        if (sys.empty()) throw std::runtime_error("no default system message in the chat template");
        msgs.insert(msgs.begin(), {"system", sys});
    }
    std::vector<llama_chat_message> chat;
    std::string manual;
    for (const auto & m : msgs) {
        chat.push_back({m.first.c_str(), m.second.c_str()});
        manual += "<|im_start|>" + m.first + "\n" + m.second + "<|im_end|>\n";
        messages_used.push_back({{"role", m.first}, {"content", m.second}});
    }
    manual += "<|im_start|>assistant\n";
    std::vector<char> buf(manual.size() * 2 + 256);
    int n = llama_chat_apply_template(tmpl, chat.data(), chat.size(), true, buf.data(), (int32_t) buf.size());
    if (n < 0 || n > (int) buf.size()) throw std::runtime_error("llama_chat_apply_template failed");
    std::string out(buf.data(), n);
    if (out != manual) throw std::runtime_error("llama_chat_apply_template disagrees with the ChatML rendering");
    return out;
}

static json top_k(const float * logits, int n_vocab, llama_token & argmax) {
    std::vector<int> idx(n_vocab);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + TOP_K, idx.end(), [&](int a, int b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    argmax = idx[0];
    json top = json::array();
    for (int i = 0; i < TOP_K; i++) top.push_back({idx[i], round4(logits[idx[i]])});
    return top;
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf SPEC.json OUT.json N_THREADS PRODUCER\n", argv[0]);
        return 2;
    }
    const std::string model_path = argv[1];
    json spec = json::parse(std::ifstream(argv[2]));
    const int n_threads = atoi(argv[4]);

    llama_backend_init();
    llama_log_set([](ggml_log_level level, const char * text, void *) {
        if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
    }, nullptr);

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "failed to load %s\n", model_path.c_str()); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const char * tmpl = llama_model_chat_template(model, nullptr);
    if (!tmpl) { fprintf(stderr, "model has no chat template\n"); return 1; }

    json out;
    std::string fname = model_path.substr(model_path.find_last_of('/') + 1);
    out["model_file"] = fname;
    out["model_sha256"] = spec.value("model_sha256", "");
    out["producer"] = argv[5];
    out["n_threads"] = n_threads;
    json eog = json::array();
    for (int t = 0; t < n_vocab; t++) if (llama_vocab_is_eog(vocab, t)) eog.push_back(t);
    out["vocab"] = {
        {"n_vocab", n_vocab},
        {"bos_id", llama_vocab_bos(vocab)},
        {"eos_id", llama_vocab_eos(vocab)},
        {"eot_id", llama_vocab_eot(vocab)},
        {"add_bos", llama_vocab_get_add_bos(vocab)},
        {"eog_ids", eog},
    };
    out["chat_template"] = tmpl;
    out["conventions"] =
        "prompt_ids: llama_tokenize(add_special=true, parse_special as given). greedy: argmax of raw logits, "
        "no sampler; stops after n_predict or after an end-of-generation token (included). steps[i]: top-8 "
        "[id, logit rounded to 1e-4] that predicted greedy_ids[i]; steps[0] from the whole prompt in one batch, "
        "steps[i>0] after feeding greedy_ids[i-1] alone; pos = KV position of the token whose logits these are. "
        "greedy_text: llama_detokenize(remove_special=false, unparse_special=true). Chat cases: the model's "
        "template semantics (default system message prepended when absent), ChatML, add_generation_prompt.";

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = 1024;
    cp.n_ubatch = 512;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.no_perf = true;

    json cases = json::array();
    for (const auto & c : spec.at("cases")) {
        json jc;
        jc["name"] = c.at("name");
        std::string text;
        bool parse_special;
        json messages_used = json::array();
        if (c.contains("messages")) {
            text = render_chat(tmpl, c.at("messages"), messages_used);
            parse_special = true;
        } else {
            text = c.at("text").get<std::string>();
            parse_special = c.value("parse_special", false);
        }
        const int n_predict = c.value("n_predict", 32);
        jc["text"] = text;
        jc["parse_special"] = parse_special;
        if (!messages_used.empty()) jc["messages"] = messages_used;

        std::vector<llama_token> prompt = tokenize(vocab, text, parse_special);
        jc["prompt_ids"] = prompt;

        llama_context * ctx = llama_init_from_model(model, cp);  // fresh KV cache per case
        if (!ctx) { fprintf(stderr, "failed to create context\n"); return 1; }
        std::vector<llama_token> gen;
        json steps = json::array();
        int pos = (int) prompt.size() - 1;
        if (llama_decode(ctx, llama_batch_get_one(prompt.data(), (int32_t) prompt.size())) != 0) {
            fprintf(stderr, "decode failed\n"); return 1;
        }
        for (int i = 0; i < n_predict; i++) {
            llama_token next;
            json top = top_k(llama_get_logits_ith(ctx, -1), n_vocab, next);
            steps.push_back({{"pos", pos}, {"top", top}});
            gen.push_back(next);
            if (llama_vocab_is_eog(vocab, next) || i + 1 == n_predict) break;
            pos++;
            if (llama_decode(ctx, llama_batch_get_one(&gen.back(), 1)) != 0) {
                fprintf(stderr, "decode failed\n"); return 1;
            }
        }
        llama_free(ctx);
        jc["greedy_ids"] = gen;
        jc["greedy_text"] = detokenize(vocab, gen);
        jc["steps"] = steps;
        fprintf(stderr, "[%s] %zu prompt tokens -> %s\n", jc["name"].get<std::string>().c_str(), prompt.size(),
                jc["greedy_text"].dump(-1, ' ', false, json::error_handler_t::replace).c_str());
        cases.push_back(jc);
    }
    out["cases"] = cases;

    json tok = json::array();
    for (const auto & t : spec.at("tokenize_only")) {
        std::string text = t.at("text").get<std::string>();
        bool ps = t.value("parse_special", false);
        std::vector<llama_token> ids = tokenize(vocab, text, ps);
        tok.push_back({{"text", text}, {"parse_special", ps}, {"ids", ids}, {"detokenized", detokenize(vocab, ids)}});
    }
    out["tokenize_only"] = tok;

    std::ofstream(argv[3]) << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
