// spiritlm_edge/client.hpp -- header-only C++17 wrapper of client.h.
//
// RAII handles, views instead of copies (Span, std::string_view), and no exceptions:
// every call returns the C library's sle_status, and no exception ever crosses into the
// C library (one thrown by your event callback is caught and counted, see
// Client::callback_exceptions()). Thread-safety and buffer ownership are those of client.h.
#ifndef SPIRITLM_EDGE_CLIENT_HPP
#define SPIRITLM_EDGE_CLIENT_HPP

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "spiritlm_edge/client.h"

namespace spiritlm_edge {

// A read-only view of contiguous elements (std::span's subset, for C++17).
template <class T>
class Span {
public:
    constexpr Span() noexcept = default;
    constexpr Span(const T *data, std::size_t size) noexcept : data_(data), size_(size) {}
    constexpr const T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr const T *begin() const noexcept { return data_; }
    constexpr const T *end() const noexcept { return data_ + size_; }
    constexpr const T &operator[](std::size_t i) const noexcept { return data_[i]; }

private:
    const T *data_ = nullptr;
    std::size_t size_ = 0;
};

inline std::string_view to_string(sle_status status) noexcept { return sle_strerror(status); }

// A view of an event: valid as long as the Event that owns it (polled events) or the
// callback invocation (callback events).
class EventView {
public:
    explicit EventView(const sle_event *event) noexcept : e_(event) {}
    sle_event_type type() const noexcept { return e_->type; }
    std::string_view response_id() const noexcept { return e_->response_id ? e_->response_id : ""; }
    Span<std::int16_t> audio() const noexcept { return {e_->audio, e_->audio_samples}; }
    int sample_rate() const noexcept { return e_->sample_rate; }
    std::string_view text() const noexcept { return {e_->text ? e_->text : "", e_->text_len}; }
    std::int64_t audio_ms() const noexcept { return e_->audio_ms; }
    sle_response_status response_status() const noexcept { return e_->response_status; }
    Span<sle_timing> timings() const noexcept { return {e_->timings, e_->n_timings}; }
    std::optional<double> timing(const char *name) const noexcept {
        for (const sle_timing &t : timings())
            if (std::string_view(t.name) == name) return t.value;
        return std::nullopt;
    }
    std::int64_t input_tokens() const noexcept { return e_->input_tokens; }
    std::int64_t output_tokens() const noexcept { return e_->output_tokens; }
    sle_status error() const noexcept { return e_->error; }
    std::string_view error_code() const noexcept { return e_->error_code ? e_->error_code : ""; }
    std::string_view message() const noexcept { return e_->message ? e_->message : ""; }
    const sle_event *get() const noexcept { return e_; }

private:
    const sle_event *e_;
};

// An owned event from Client::poll().
class Event {
public:
    Event() noexcept = default;
    explicit operator bool() const noexcept { return static_cast<bool>(e_); }
    EventView view() const noexcept { return EventView(e_.get()); }
    const EventView operator*() const noexcept { return view(); }
    void reset(sle_event *e = nullptr) noexcept { e_.reset(e); }

private:
    struct Free {
        void operator()(sle_event *e) const noexcept { sle_event_free(e); }
    };
    std::unique_ptr<sle_event, Free> e_;
};

// The options of client.h with owned strings.
struct Options {
    std::optional<std::string> token;
    std::optional<std::string> voice;       // "0".."3"
    int output_modalities = SLE_MODALITY_AUDIO;
    bool server_vad = true;
    int silence_duration_ms = 0;            // <= 0: the server's default
    int prefix_padding_ms = -1;             // < 0: the server's default
    double temperature = -1.0;              // < 0: the server's default
    double top_p = -1.0;
    int max_output_tokens = 0;
    int output_sample_rate = 24000;
    int connect_timeout_ms = 10000;
    int keepalive_s = 10;
    std::optional<std::string> ca_file;     // wss://: the CAs to trust; empty: the system's
};

using EventCallback = std::function<void(const EventView &)>;

class Client {
public:
    Client() noexcept = default;
    Client(const Client &) = delete;
    Client &operator=(const Client &) = delete;
    Client(Client &&other) noexcept : c_(std::exchange(other.c_, nullptr)), cb_(std::move(other.cb_)) {}
    Client &operator=(Client &&other) noexcept {
        if (this != &other) {
            reset();
            c_ = std::exchange(other.c_, nullptr);
            cb_ = std::move(other.cb_);
        }
        return *this;
    }
    ~Client() { reset(); }

    // Connects; with a callback, events go to it on the library's thread (not to poll()).
    // The callback object lives on the heap, so moving the Client is safe meanwhile.
    sle_status connect(const std::string &url, const Options &o = {}, EventCallback callback = {}) noexcept {
        reset();
        sle_options opts;
        sle_options_init(&opts);
        opts.token = o.token ? o.token->c_str() : nullptr;
        opts.voice = o.voice ? o.voice->c_str() : nullptr;
        opts.output_modalities = o.output_modalities;
        opts.server_vad = o.server_vad ? 1 : 0;
        opts.silence_duration_ms = o.silence_duration_ms;
        opts.prefix_padding_ms = o.prefix_padding_ms;
        opts.temperature = o.temperature;
        opts.top_p = o.top_p;
        opts.max_output_tokens = o.max_output_tokens;
        opts.output_sample_rate = o.output_sample_rate;
        opts.connect_timeout_ms = o.connect_timeout_ms;
        opts.keepalive_s = o.keepalive_s;
        opts.ca_file = o.ca_file ? o.ca_file->c_str() : nullptr;
        if (callback) {
            cb_.reset(new (std::nothrow) CallbackHolder{std::move(callback), {0}});
            if (!cb_) return SLE_ERR_NO_MEMORY;
            opts.on_event = &Client::trampoline;
            opts.user_data = cb_.get();
        }
        return sle_connect(url.c_str(), &opts, &c_);
    }

    sle_status send_audio(Span<std::int16_t> pcm, int sample_rate) noexcept {
        return sle_send_audio_s16(c_, pcm.data(), pcm.size(), sample_rate);
    }
    sle_status send_audio(Span<float> pcm, int sample_rate) noexcept {
        return sle_send_audio_f32(c_, pcm.data(), pcm.size(), sample_rate);
    }
    sle_status send_text(const std::string &text) noexcept { return sle_send_text(c_, text.c_str()); }
    sle_status commit() noexcept { return sle_commit(c_); }
    sle_status clear_audio() noexcept { return sle_clear_audio(c_); }
    sle_status cancel() noexcept { return sle_cancel(c_); }
    sle_status close() noexcept { return sle_close(c_); }

    sle_status poll(int timeout_ms, Event &out) noexcept {
        sle_event *e = nullptr;
        sle_status st = sle_poll(c_, timeout_ms, &e);
        out.reset(e);
        return st;
    }

    std::string_view last_error() const noexcept { return c_ ? sle_last_error(c_) : ""; }
    unsigned callback_exceptions() const noexcept { return cb_ ? cb_->exceptions.load() : 0u; }
    sle_client *get() const noexcept { return c_; }
    explicit operator bool() const noexcept { return c_ != nullptr; }

    // Closes and frees; the callback is not called after this returns.
    void reset() noexcept {
        if (c_) sle_destroy(std::exchange(c_, nullptr));
        cb_.reset();
    }

private:
    struct CallbackHolder {
        EventCallback fn;
        std::atomic<unsigned> exceptions;
    };
    static void trampoline(const sle_event *event, void *user) noexcept {
        auto *holder = static_cast<CallbackHolder *>(user);
        try {
            holder->fn(EventView(event));
        } catch (...) {
            holder->exceptions.fetch_add(1);
        }
    }

    sle_client *c_ = nullptr;
    std::unique_ptr<CallbackHolder> cb_;
};

}  // namespace spiritlm_edge

#endif  // SPIRITLM_EDGE_CLIENT_HPP
