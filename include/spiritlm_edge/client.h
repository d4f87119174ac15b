/*
 * spiritlm_edge/client.h -- C client for `spiritlm-edge serve`.
 *
 * The server speaks the OpenAI Realtime protocol's core subset over a WebSocket
 * (ws://host:port/v1/realtime, PCM16 at 24 kHz in base64 JSON; see docs/protocol.md).
 * This library hides the protocol: send microphone audio in the format you have,
 * receive the spoken answer as int16 PCM at the rate your speaker wants.
 *
 *   sle_options o; sle_options_init(&o);
 *   o.token = "secret";
 *   sle_client *c = NULL;
 *   if (sle_connect("ws://127.0.0.1:8765/v1/realtime", &o, &c) != SLE_OK) {
 *       fprintf(stderr, "%s\n", sle_last_error(c)); sle_destroy(c); return 1;
 *   }
 *   sle_send_audio_s16(c, pcm, n, 16000);       ... as the microphone delivers ...
 *   sle_event *ev;
 *   while (sle_poll(c, 100, &ev) == SLE_OK) { ...; sle_event_free(ev); }
 *   sle_destroy(c);
 *
 * Versioning: the ABI follows SLE_VERSION_MAJOR (the shared library's SOVERSION).
 * Structs the caller fills (sle_options) start with a `struct_size` field set by
 * sle_options_init(), so fields can be added in minor versions without breaking
 * binaries built against older headers; structs the library fills (sle_event) only
 * ever grow at their end. Platforms: POSIX (Linux, including Jetson; threads are pthreads).
 *
 * Status codes: every function that can fail returns an sle_status (SLE_OK == 0,
 * errors are negative). sle_strerror() gives a static description of a code;
 * sle_last_error() the detailed message of the handle's most recent failure.
 *
 * Threads: each connected client owns one service thread (the "library's thread").
 * All functions taking an sle_client* may be called from any thread, concurrently,
 * except sle_destroy(), which must be called exactly once, by one thread, when no
 * other call on that handle is in progress, and never from inside the event callback.
 * The event callback runs on the library's thread; it may call the send, commit,
 * cancel and clear functions (they only queue messages), but must not block for long:
 * while it runs, no network traffic is served for that client.
 * Polled events queue without a bound while the application does not poll: poll
 * regularly (or use the callback).
 *
 * Buffers: the library never keeps a pointer to a caller's buffer after a call
 * returns (audio and strings are copied). Events obtained with sle_poll() belong
 * to the caller until sle_event_free(); events passed to the callback belong to
 * the library and are valid only during the callback.
 */
#ifndef SPIRITLM_EDGE_CLIENT_H
#define SPIRITLM_EDGE_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SLE_VERSION_MAJOR 1
#define SLE_VERSION_MINOR 0
#define SLE_VERSION_PATCH 0

#if defined(__GNUC__)
#define SLE_API __attribute__((visibility("default")))
#else
#define SLE_API
#endif

/* Status codes. Negative values are errors. */
typedef enum sle_status {
    SLE_OK = 0,
    SLE_ERR_INVALID_ARGUMENT = -1, /* NULL handle, unsupported rate, bad option value */
    SLE_ERR_BAD_URL = -2,          /* not ws://host[:port]/path or wss://... */
    SLE_ERR_CONNECT = -3,          /* connection refused, host unreachable, TLS or HTTP failure */
    SLE_ERR_TIMEOUT = -4,          /* connect: no session within connect_timeout_ms; poll: no event yet */
    SLE_ERR_UNAUTHORIZED = -5,     /* the server refused the token (HTTP 401/403 on the handshake) */
    SLE_ERR_PROTOCOL = -6,         /* the server sent something that is not the Realtime protocol */
    SLE_ERR_CLOSED = -7,           /* the connection is closed (by the server, the network or sle_close) */
    SLE_ERR_SERVER = -8,           /* the server answered with an `error` event */
    SLE_ERR_NO_MEMORY = -9,
    SLE_ERR_QUEUE_FULL = -10,      /* more than SLE_MAX_QUEUED_BYTES wait to be sent: the link is too slow */
    SLE_ERR_AUDIO = -11,           /* the resampler failed */
    SLE_ERR_INTERNAL = -12         /* a library call failed unexpectedly (see sle_last_error) */
} sle_status;

/* Bytes of outgoing messages a client queues before sends return SLE_ERR_QUEUE_FULL
 * (about 4 minutes of 24 kHz audio). */
#define SLE_MAX_QUEUED_BYTES (16u * 1024u * 1024u)

/* Output modalities (a bit set): SLE_MODALITY_AUDIO, speech answers; SLE_MODALITY_TEXT,
 * text answers; both, the model chooses and its text streams as text deltas. */
enum { SLE_MODALITY_TEXT = 1, SLE_MODALITY_AUDIO = 2 };

typedef struct sle_client sle_client;
typedef struct sle_event sle_event;

/* The event callback (see sle_options.on_event). */
typedef void (*sle_event_callback)(const sle_event *event, void *user_data);

/* Connection options. Always initialise with sle_options_init(), then change fields. */
typedef struct sle_options {
    size_t struct_size;       /* set by sle_options_init(); do not change */
    const char *token;        /* bearer token (Authorization header), or NULL; copied */
    const char *voice;        /* the vocoder speaker, "0".."3", or NULL for the server's default; copied */
    int output_modalities;    /* SLE_MODALITY_AUDIO (default), SLE_MODALITY_TEXT, or both */
    int server_vad;           /* 1 (default): the server ends turns on silence; 0: call sle_commit() */
    int silence_duration_ms;  /* server VAD: silence that ends a turn; <= 0: the server's default */
    int prefix_padding_ms;    /* server VAD: audio kept before speech starts; < 0: the server's default */
    double temperature;       /* sampling; < 0: the server's default */
    double top_p;             /* sampling; < 0: the server's default */
    int max_output_tokens;    /* per answer; <= 0: the server's default */
    int output_sample_rate;   /* rate of audio in SLE_EVENT_AUDIO_DELTA: 8000..192000 Hz, default 24000 */
    int connect_timeout_ms;   /* bound on sle_connect(), from the call to a configured session; default
                                 10000 (a host name is resolved by the system resolver first, outside it) */
    int keepalive_s;          /* WebSocket ping after this idle time, hang up after twice it; 0: off; default 10 */
    sle_event_callback on_event; /* NULL (default): queue events for sle_poll(); else called on the library's thread */
    void *user_data;          /* passed to on_event */
    const char *ca_file;      /* wss://: PEM file of the certificate authorities to trust (e.g. the
                                 server's self-signed certificate); NULL: the system's; copied */
} sle_options;

/* Fills *options with the defaults above. */
SLE_API void sle_options_init(sle_options *options);

/* Event kinds. */
typedef enum sle_event_type {
    SLE_EVENT_SPEECH_STARTED = 1, /* server VAD heard the user start; over an answer, the server
                                     cancels it once the speech lasts (its barge-in): the answer's
                                     RESPONSE_DONE then says cancelled, time to flush playback */
    SLE_EVENT_SPEECH_STOPPED = 2, /* server VAD heard the user stop; an answer follows */
    SLE_EVENT_RESPONSE_STARTED = 3, /* the server began an answer (response_id set) */
    SLE_EVENT_AUDIO_DELTA = 4,    /* audio/audio_samples/sample_rate: the next piece of the answer */
    SLE_EVENT_TEXT_DELTA = 5,     /* text/text_len: the next piece of the answer's text */
    SLE_EVENT_RESPONSE_DONE = 6,  /* the answer ended: response_status, timings, usage */
    SLE_EVENT_ERROR = 7           /* error/error_code/message; after SLE_ERR_CLOSED no more events come */
} sle_event_type;

typedef enum sle_response_status {
    SLE_RESPONSE_COMPLETED = 0,
    SLE_RESPONSE_CANCELLED = 1,   /* sle_cancel(), or the user spoke over it */
    SLE_RESPONSE_INCOMPLETE = 2,  /* stopped at max_output_tokens */
    SLE_RESPONSE_FAILED = 3
} sle_response_status;

/* One named figure from the server's per-turn timings: response.done's extension field
 * `response.spiritlm` (docs/protocol.md): audio_ms, first_audio_ms, total_ms and, from its
 * `timings`, encode_s, prefill_s, decode_s, vocoder_s, first_audio_s, decode_tokens_per_s... */
typedef struct sle_timing {
    const char *name;             /* the server's name, e.g. "first_audio_s" */
    double value;                 /* as the server sent it: *_s seconds, *_ms milliseconds */
} sle_timing;

/* An event. Fields not listed for a type are zero / NULL. All strings are NUL-terminated. */
struct sle_event {
    sle_event_type type;
    const char *response_id;      /* AUDIO_DELTA, TEXT_DELTA, RESPONSE_STARTED, RESPONSE_DONE */
    /* AUDIO_DELTA */
    const int16_t *audio;         /* mono PCM at sample_rate (= options.output_sample_rate) */
    size_t audio_samples;
    int sample_rate;
    /* TEXT_DELTA */
    const char *text;
    size_t text_len;
    /* SPEECH_STARTED / SPEECH_STOPPED: position in the input audio, ms (-1 if not sent) */
    int64_t audio_ms;
    /* RESPONSE_DONE */
    sle_response_status response_status;
    const sle_timing *timings;    /* the server's per-stage timings, n_timings of them */
    size_t n_timings;
    int64_t input_tokens, output_tokens; /* usage; -1 if not sent */
    /* ERROR */
    sle_status error;             /* SLE_ERR_SERVER for the server's error events; SLE_ERR_CLOSED,
                                     SLE_ERR_PROTOCOL, SLE_ERR_AUDIO for the library's */
    const char *error_code;       /* the server's error code (e.g. "invalid_value"), or NULL */
    const char *message;          /* human-readable */
};

/* Returns the value of the timing called `name`, or `fallback` when the event has none. */
SLE_API double sle_event_timing(const sle_event *event, const char *name, double fallback);

/* Static description of a status code (never NULL). */
SLE_API const char *sle_strerror(sle_status status);

/* "MAJOR.MINOR.PATCH" of the library actually loaded. */
SLE_API const char *sle_version(void);

/*
 * Connects to url (ws://host[:port]/path[?query] or wss://...), configures the session
 * with `options` (NULL: defaults) and returns once the server confirmed it
 * (session.updated), or fails within options->connect_timeout_ms.
 * *client is set even on failure (unless out of memory), so that sle_last_error() can
 * say why; always release it with sle_destroy().
 */
SLE_API sle_status sle_connect(const char *url, const sle_options *options, sle_client **client);

/*
 * Sends microphone audio (mono) at `sample_rate` (16000, 24000 or 48000 Hz; other rates
 * from 8000 to 192000 work too). It is resampled to the protocol's 24 kHz inside.
 * Changing the rate between calls restarts the resampler. Float samples are clipped to
 * [-1, 1]. Returns at once (the audio is queued); SLE_ERR_CLOSED once the connection is gone.
 */
SLE_API sle_status sle_send_audio_s16(sle_client *client, const int16_t *samples, size_t n, int sample_rate);
SLE_API sle_status sle_send_audio_f32(sle_client *client, const float *samples, size_t n, int sample_rate);

/* Manual turns (server_vad = 0): ends the user's turn and asks for the answer
 * (input_audio_buffer.commit + response.create). */
SLE_API sle_status sle_commit(sle_client *client);

/* Drops audio sent but not yet committed (input_audio_buffer.clear). */
SLE_API sle_status sle_clear_audio(sle_client *client);

/* A text turn: the user says `text` (UTF-8, copied) and the server answers. */
SLE_API sle_status sle_send_text(sle_client *client, const char *text);

/*
 * Barge-in: stops the answer in progress (response.cancel). From this call on, audio and
 * text deltas of that answer are dropped by the library, even those already on the wire;
 * its SLE_EVENT_RESPONSE_DONE (status cancelled) still comes. Harmless when nothing runs
 * (the server's "response_cancel_not_active" answer is not passed on as an error event).
 */
SLE_API sle_status sle_cancel(sle_client *client);

/*
 * Waits up to timeout_ms (0: do not wait; < 0: wait forever) for the next event.
 * SLE_OK: *event is set; free it with sle_event_free(). SLE_ERR_TIMEOUT: none came.
 * SLE_ERR_CLOSED: the connection is closed and every event was taken.
 * SLE_ERR_INVALID_ARGUMENT: the client was connected with a callback.
 */
SLE_API sle_status sle_poll(sle_client *client, int timeout_ms, sle_event **event);

SLE_API void sle_event_free(sle_event *event);

/* Closes the connection (a normal WebSocket close, waiting at most 2 s for the server) and
 * stops the library's thread; queued events stay readable with sle_poll(). Idempotent.
 * Not from the event callback (SLE_ERR_INVALID_ARGUMENT there). */
SLE_API sle_status sle_close(sle_client *client);

/* The detailed message of the handle's most recent failure ("" if none). The pointer
 * stays valid until the next call on the handle; copy it to keep it. NULL client: a
 * message for a failed allocation. */
SLE_API const char *sle_last_error(const sle_client *client);

/* Closes if needed and frees everything. NULL is accepted. */
SLE_API void sle_destroy(sle_client *client);

#ifdef __cplusplus
}
#endif

#endif /* SPIRITLM_EDGE_CLIENT_H */
