// duplex: a live, hands-free conversation with `spiritlm-edge serve` on PortAudio.
//
//   duplex [--token T] [--voice V] [--rate HZ] [--seconds N] [--input DEV] [--output DEV] [--list] URL
//
// DEV: a device index or part of its name (--list shows them).
//
// The microphone streams to the server (server VAD ends turns); answers play on the
// speaker as they arrive. Barge-in: when the server hears you speak over an answer, the
// answer's audio still queued here is dropped and the answer cancelled. Use a headset, or
// echo cancellation, when the speaker is near the microphone: otherwise the answer can
// interrupt itself.
#include <portaudio.h>
#include <spiritlm_edge/client.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

namespace {

// Answer audio waiting for the speaker: written on the library's thread, read by the loop.
class Playback {
public:
    void push(spiritlm_edge::Span<std::int16_t> pcm) {
        std::lock_guard<std::mutex> lock(mu_);
        samples_.insert(samples_.end(), pcm.begin(), pcm.end());
    }
    // Drops what is queued; returns how many samples that was.
    std::size_t flush() {
        std::lock_guard<std::mutex> lock(mu_);
        std::size_t n = samples_.size();
        samples_.clear();
        return n;
    }
    // Fills `out` with what is queued, silence after it; returns the samples that were audio.
    std::size_t pop(std::int16_t *out, std::size_t n) {
        std::lock_guard<std::mutex> lock(mu_);
        std::size_t k = n < samples_.size() ? n : samples_.size();
        for (std::size_t i = 0; i < k; i++) {
            out[i] = samples_.front();
            samples_.pop_front();
        }
        std::memset(out + k, 0, (n - k) * sizeof *out);
        return k;
    }

private:
    std::mutex mu_;
    std::deque<std::int16_t> samples_;
};

int usage() {
    std::fprintf(stderr,
                 "usage: duplex [--token T] [--voice V] [--rate HZ] [--seconds N] [--input DEV] [--output DEV] "
                 "[--list] URL\n");
    return 2;
}

// A device by index, or the first whose name contains `spec` and has the channels.
PaDeviceIndex find_device(const std::string &spec, bool input) {
    if (spec.empty()) return input ? Pa_GetDefaultInputDevice() : Pa_GetDefaultOutputDevice();
    char *end = nullptr;
    long index = std::strtol(spec.c_str(), &end, 10);
    if (end && *end == 0) return index >= 0 && index < Pa_GetDeviceCount() ? static_cast<PaDeviceIndex>(index) : paNoDevice;
    for (int i = 0; i < Pa_GetDeviceCount(); i++) {
        const PaDeviceInfo *d = Pa_GetDeviceInfo(i);
        if ((input ? d->maxInputChannels : d->maxOutputChannels) > 0 && std::strstr(d->name, spec.c_str())) return i;
    }
    return paNoDevice;
}

void list_devices() {
    for (int i = 0; i < Pa_GetDeviceCount(); i++) {
        const PaDeviceInfo *d = Pa_GetDeviceInfo(i);
        std::printf("%3d  in %d  out %d  %.0f Hz  %s\n", i, d->maxInputChannels, d->maxOutputChannels,
                    d->defaultSampleRate, d->name);
    }
}

}  // namespace

int main(int argc, char **argv) {
    spiritlm_edge::Options options;
    int rate = 48000;
    double seconds = 0;  // 0: until interrupted
    std::string input_dev, output_dev;  // index or name; empty: the defaults
    bool list = false;
    const char *url = nullptr;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (i + 1 < argc && a == "--token") options.token = argv[++i];
        else if (i + 1 < argc && a == "--voice") options.voice = argv[++i];
        else if (i + 1 < argc && a == "--rate") rate = std::atoi(argv[++i]);
        else if (i + 1 < argc && a == "--seconds") seconds = std::atof(argv[++i]);
        else if (i + 1 < argc && a == "--input") input_dev = argv[++i];
        else if (i + 1 < argc && a == "--output") output_dev = argv[++i];
        else if (a == "--list") list = true;
        else if (a[0] == '-' || url) return usage();
        else url = argv[i];
    }
    if (Pa_Initialize() != paNoError) {
        std::fprintf(stderr, "duplex: PortAudio does not start\n");
        return 1;
    }
    if (list) {
        list_devices();
        Pa_Terminate();
        return 0;
    }
    if (!url) {
        Pa_Terminate();
        return usage();
    }

    Playback playback;
    std::atomic<bool> failed{false};
    spiritlm_edge::Client client;
    options.output_sample_rate = rate;  // answers arrive at the speaker's rate
    sle_status st = client.connect(url, options, [&](const spiritlm_edge::EventView &e) {
        switch (e.type()) {
        case SLE_EVENT_SPEECH_STARTED:
            // Barge-in. Answers are generated faster than they play, so the one being heard
            // has often finished on the server: the audio queued here is what must stop.
            if (playback.flush() > 0) {
                client.cancel();  // and the answer itself if it still runs (harmless if not)
                std::printf("\n[interrupted]");
            }
            std::printf("\n[listening]\n");
            break;
        case SLE_EVENT_SPEECH_STOPPED: std::printf("[thinking]\n"); break;
        case SLE_EVENT_AUDIO_DELTA: playback.push(e.audio()); break;
        case SLE_EVENT_TEXT_DELTA: std::printf("%.*s", static_cast<int>(e.text().size()), e.text().data()); break;
        case SLE_EVENT_RESPONSE_DONE:
            if (e.response_status() == SLE_RESPONSE_CANCELLED) playback.flush();  // the server's barge-in
            std::printf("\n[done: first audio after %.0f ms]\n", e.timing("first_audio_s").value_or(-1) * 1e3);
            break;
        case SLE_EVENT_ERROR:
            std::fprintf(stderr, "\nduplex: %s\n", std::string(e.message()).c_str());
            if (e.error() == SLE_ERR_CLOSED) failed = true;
            break;
        default: break;
        }
        std::fflush(stdout);
    });
    if (st != SLE_OK) {
        std::fprintf(stderr, "duplex: %s: %s\n", sle_strerror(st), std::string(client.last_error()).c_str());
        Pa_Terminate();
        return 1;
    }

    PaStreamParameters in{}, out{};
    in.device = find_device(input_dev, true);
    out.device = find_device(output_dev, false);
    if (in.device == paNoDevice || out.device == paNoDevice) {
        std::fprintf(stderr, "duplex: no %s device (see --list)\n", in.device == paNoDevice ? "input" : "output");
        Pa_Terminate();
        return 1;
    }
    in.channelCount = out.channelCount = 1;
    in.sampleFormat = out.sampleFormat = paInt16;
    in.suggestedLatency = Pa_GetDeviceInfo(in.device)->defaultLowInputLatency;
    out.suggestedLatency = Pa_GetDeviceInfo(out.device)->defaultLowOutputLatency;
    const unsigned long frames = static_cast<unsigned long>(rate / 50);  // 20 ms
    PaStream *stream = nullptr;
    PaError err = Pa_OpenStream(&stream, &in, &out, rate, frames, paClipOff, nullptr, nullptr);
    if (err == paNoError) err = Pa_StartStream(stream);
    if (err != paNoError) {
        std::fprintf(stderr, "duplex: cannot open the audio devices at %d Hz: %s\n", rate, Pa_GetErrorText(err));
        Pa_Terminate();
        return 1;
    }
    std::printf("[listening] speak; Ctrl-C to stop\n");
    std::vector<std::int16_t> mic(frames), spk(frames);
    const auto start = std::chrono::steady_clock::now();
    int rc = 0;
    while (!failed) {
        if (seconds > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > seconds)
            break;
        err = Pa_ReadStream(stream, mic.data(), frames);  // blocks for 20 ms of microphone
        if (err != paNoError && err != paInputOverflowed) {
            std::fprintf(stderr, "duplex: microphone: %s\n", Pa_GetErrorText(err));
            rc = 1;
            break;
        }
        st = client.send_audio(spiritlm_edge::Span<std::int16_t>(mic.data(), mic.size()), rate);
        if (st != SLE_OK) {
            std::fprintf(stderr, "duplex: %s\n", std::string(client.last_error()).c_str());
            rc = 1;
            break;
        }
        playback.pop(spk.data(), spk.size());
        err = Pa_WriteStream(stream, spk.data(), frames);
        if (err != paNoError && err != paOutputUnderflowed) {
            std::fprintf(stderr, "duplex: speaker: %s\n", Pa_GetErrorText(err));
            rc = 1;
            break;
        }
    }
    Pa_StopStream(stream);
    Pa_CloseStream(stream);
    Pa_Terminate();
    client.reset();
    return failed ? 1 : rc;
}
