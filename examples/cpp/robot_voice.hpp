// RobotVoice: what a robot's node holds to talk through `spiritlm-edge serve`.
//
// One client, the microphone in, the answers out to sinks you give (a ROS 2 node passes
// lambdas that publish on its audio and text topics), interrupt() for barge-in (a ROS 2
// node calls it from its interrupt service). It has no ROS dependency, so the tests
// compile and run it (tests/c/test_robot_voice.cpp); README "From C and C++" shows the
// ROS 2 wiring.
//
// Threads: the sinks run on the client library's thread, one call at a time; hear(),
// say(), interrupt() and speaking() may be called from any thread.
#pragma once

#include <spiritlm_edge/client.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace robot {

class RobotVoice {
public:
    struct Sinks {
        std::function<void(spiritlm_edge::Span<std::int16_t> pcm, int sample_rate)> audio;  // a piece of the answer
        std::function<void(std::string_view text)> text;                                    // a piece of its text
        std::function<void(const spiritlm_edge::EventView &done)> done;                      // the answer ended
        std::function<void(sle_status status, std::string_view message)> error;
    };

    // Connects; `options` says the output rate your audio topic uses, the voice, the VAD.
    sle_status start(const std::string &url, const spiritlm_edge::Options &options, Sinks sinks);
    // Microphone audio (the node's audio subscription callback).
    sle_status hear(spiritlm_edge::Span<std::int16_t> pcm, int sample_rate);
    // A typed request ("say hello").
    sle_status say(const std::string &text);
    // Stops the answer being spoken; true if one was. Its remaining audio is not delivered.
    bool interrupt();
    bool speaking() const { return speaking_.load(); }
    std::string last_error() const { return std::string(client_.last_error()); }
    void stop() { client_.reset(); }

private:
    void on_event(const spiritlm_edge::EventView &event);

    spiritlm_edge::Client client_;
    Sinks sinks_;
    std::atomic<bool> speaking_{false};
};

}  // namespace robot
