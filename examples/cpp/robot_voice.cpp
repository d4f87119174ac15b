#include "robot_voice.hpp"

#include <utility>

namespace robot {

sle_status RobotVoice::start(const std::string &url, const spiritlm_edge::Options &options, Sinks sinks) {
    sinks_ = std::move(sinks);
    return client_.connect(url, options, [this](const spiritlm_edge::EventView &e) { on_event(e); });
}

sle_status RobotVoice::hear(spiritlm_edge::Span<std::int16_t> pcm, int sample_rate) {
    return client_.send_audio(pcm, sample_rate);
}

sle_status RobotVoice::say(const std::string &text) { return client_.send_text(text); }

bool RobotVoice::interrupt() {
    const bool was_speaking = speaking_.exchange(false);
    if (was_speaking) client_.cancel();
    return was_speaking;
}

void RobotVoice::on_event(const spiritlm_edge::EventView &e) {
    switch (e.type()) {
    case SLE_EVENT_RESPONSE_STARTED:
        speaking_ = true;
        break;
    case SLE_EVENT_AUDIO_DELTA:
        if (sinks_.audio) sinks_.audio(e.audio(), e.sample_rate());
        break;
    case SLE_EVENT_TEXT_DELTA:
        if (sinks_.text) sinks_.text(e.text());
        break;
    case SLE_EVENT_RESPONSE_DONE:
        speaking_ = false;
        if (sinks_.done) sinks_.done(e);
        break;
    case SLE_EVENT_ERROR:
        if (sinks_.error) sinks_.error(e.error(), e.message());
        break;
    case SLE_EVENT_SPEECH_STARTED:
    case SLE_EVENT_SPEECH_STOPPED:
        break;
    }
}

}  // namespace robot
