// The ROS 2 README example's class (examples/cpp/robot_voice.hpp) against the server:
// a typed request is answered with audio through the sink; interrupt() stops the answer
// (its remaining audio is not delivered); the next request is answered in full.
#include "robot_voice.hpp"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <string>

namespace {

int failures = 0;
#define CHECK(cond, what)                                                              \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            std::fprintf(stderr, "%s:%d: CHECK(%s) failed: %s\n", __FILE__, __LINE__, #cond, what); \
            failures++;                                                                \
        }                                                                              \
    } while (0)

std::map<std::string, std::string> read_env(const char *path) {
    std::map<std::string, std::string> env;
    std::ifstream f(path);
    for (std::string line; std::getline(f, line);) {
        auto eq = line.find('=');
        if (eq != std::string::npos) env[line.substr(0, eq)] = line.substr(eq + 1);
    }
    return env;
}

struct Answers {
    std::mutex mu;
    std::condition_variable cv;
    size_t samples = 0;
    int rate = 0;
    int done = 0;
    int errors = 0;
    sle_response_status last_status = SLE_RESPONSE_COMPLETED;
};

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    auto env = read_env(argv[1]);
    if (env["URL"].empty()) {
        std::fprintf(stderr, "no server in %s\n", argv[1]);
        return 1;
    }
    Answers a;
    robot::RobotVoice voice;
    robot::RobotVoice::Sinks sinks;
    sinks.audio = [&](spiritlm_edge::Span<std::int16_t> pcm, int rate) {
        std::lock_guard<std::mutex> lock(a.mu);
        a.samples += pcm.size();
        a.rate = rate;
        a.cv.notify_all();
    };
    sinks.done = [&](const spiritlm_edge::EventView &done) {
        std::lock_guard<std::mutex> lock(a.mu);
        a.done++;
        a.last_status = done.response_status();
        a.cv.notify_all();
    };
    sinks.error = [&](sle_status, std::string_view message) {
        std::lock_guard<std::mutex> lock(a.mu);
        std::fprintf(stderr, "  error: %.*s\n", static_cast<int>(message.size()), message.data());
        a.errors++;
        a.cv.notify_all();
    };
    spiritlm_edge::Options options;
    options.token = env["TOKEN"];
    options.server_vad = false;
    options.output_sample_rate = 16000;
    options.max_output_tokens = 1000;
    sle_status st = voice.start(env["URL"], options, sinks);
    if (st != SLE_OK) {
        std::fprintf(stderr, "start: %s: %s\n", sle_strerror(st), voice.last_error().c_str());
        return 1;
    }
    const auto wait = std::chrono::seconds(90);

    // 1. a request, interrupted once audio flows
    CHECK(voice.say("Tell me a long story.") == SLE_OK, "say");
    {
        std::unique_lock<std::mutex> lock(a.mu);
        CHECK(a.cv.wait_for(lock, wait, [&] { return a.samples > 0 || a.done > 0; }), "no audio");
    }
    CHECK(voice.speaking(), "not speaking while audio flows");
    CHECK(voice.interrupt(), "interrupt() found nothing to stop");
    size_t at_interrupt;
    {
        std::unique_lock<std::mutex> lock(a.mu);
        at_interrupt = a.samples;
        CHECK(a.cv.wait_for(lock, wait, [&] { return a.done > 0; }), "no response.done after interrupt");
        CHECK(a.last_status == SLE_RESPONSE_CANCELLED, "the interrupted answer was not cancelled");
        CHECK(a.samples == at_interrupt, "audio delivered after interrupt()");
    }
    CHECK(!voice.speaking() && !voice.interrupt(), "still speaking after the answer ended");

    // 2. the next request is answered in full, at the topic's rate
    {
        std::lock_guard<std::mutex> lock(a.mu);
        a.samples = 0;
    }
    CHECK(voice.say("Hello.") == SLE_OK, "say");
    {
        std::unique_lock<std::mutex> lock(a.mu);
        CHECK(a.cv.wait_for(lock, wait, [&] { return a.done > 1; }), "no second answer");
        CHECK(a.last_status != SLE_RESPONSE_CANCELLED && a.samples > 0 && a.rate == 16000, "second answer");
        CHECK(a.errors == 0, "error events");
    }
    voice.stop();
    std::fprintf(stderr, "robot_voice: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
