// Runs the code README.md's "From C and C++" section shows (extracted at configure time by
// readme_snippets.py): ask() on the LibriSpeech clip, and the ROS 2-style VoiceNode fed the
// clip as its microphone until it publishes an answer.
#include <sndfile.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <thread>

#include "readme_2.cpp"  // VoiceNode

extern "C" int ask(const char *url, const char *token, const int16_t *question, size_t n);

namespace {

std::map<std::string, std::string> read_env(const char *path) {
    std::map<std::string, std::string> env;
    std::ifstream f(path);
    for (std::string line; std::getline(f, line);) {
        auto eq = line.find('=');
        if (eq != std::string::npos) env[line.substr(0, eq)] = line.substr(eq + 1);
    }
    return env;
}

std::vector<std::int16_t> read_clip(const std::string &path) {
    SF_INFO info;
    std::memset(&info, 0, sizeof info);
    SNDFILE *f = sf_open(path.c_str(), SFM_READ, &info);
    std::vector<std::int16_t> pcm;
    if (!f) return pcm;
    if (info.channels == 1 && info.samplerate == 16000) {
        pcm.resize(static_cast<size_t>(info.frames));
        pcm.resize(static_cast<size_t>(sf_readf_short(f, pcm.data(), info.frames)));
    }
    sf_close(f);
    return pcm;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const std::string which = argv[1];
    auto env = read_env(argv[2]);
    auto clip = read_clip(env["CLIP"]);
    if (env["URL"].empty() || clip.empty()) {
        std::fprintf(stderr, "no server or no 16 kHz clip in %s\n", argv[2]);
        return 1;
    }
    if (which == "ask") return ask(env["URL"].c_str(), env["TOKEN"].c_str(), clip.data(), clip.size());

    std::atomic<size_t> published{0};
    std::atomic<int> rate{0};
    VoiceNode node(env["URL"], env["TOKEN"], [&](const AudioChunk &chunk) {
        published += chunk.samples.size();
        rate = chunk.sample_rate;
    });
    if (node.started() != SLE_OK) {
        std::fprintf(stderr, "VoiceNode did not start: %s\n", sle_strerror(node.started()));
        return 1;
    }
    AudioChunk mic{16000, {}};
    for (size_t i = 0; i < clip.size(); i += 1600) {  // the microphone topic: 100 ms messages
        mic.samples.assign(clip.begin() + static_cast<long>(i),
                           clip.begin() + static_cast<long>(std::min(clip.size(), i + 1600)));
        node.on_microphone(mic);
    }
    mic.samples.assign(1600, 0);
    for (int i = 0; i < 30; i++) node.on_microphone(mic);  // 3 s of silence end the turn
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(90);
    while (published.load() == 0 && std::chrono::steady_clock::now() < end)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    node.on_interrupt();
    std::fprintf(stderr, "VoiceNode published %zu samples at %d Hz\n", published.load(), rate.load());
    return published.load() > 0 && rate.load() == 16000 ? 0 : 1;
}
