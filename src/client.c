/*
 * The C client: one libwebsockets context and service thread per client, cJSON for the
 * protocol's JSON, lws_b64_* for its base64 audio, soxr for every rate conversion.
 *
 * Threads: the caller's threads only queue outgoing messages (under `mu`) and wake the
 * service thread with lws_cancel_service(); all lws calls on a connection happen on the
 * service thread, as libwebsockets requires.
 */
#define _POSIX_C_SOURCE 200809L

#include "spiritlm_edge/client.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <libwebsockets.h>
#include <limits.h>
#include <pthread.h>
#include <soxr.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PROTOCOL_RATE 24000
/* Audio per input_audio_buffer.append message: 100 ms at 24 kHz (6.4 kB of base64). */
#define APPEND_SAMPLES 2400
/* A server message larger than this is a protocol error (an audio delta is a few kB). */
#define MAX_MESSAGE_BYTES (8u * 1024u * 1024u)
#define CLOSE_WAIT_MS 2000

typedef struct out_msg {
    struct out_msg *next;
    size_t len;          /* payload bytes after LWS_PRE */
    unsigned char buf[]; /* LWS_PRE + payload */
} out_msg;

/* An event and the storage its pointers refer to; `pub` first so the two convert. */
typedef struct owned_event {
    sle_event pub;
    struct owned_event *next;
    char *response_id;
    char *text;
    char *error_code;
    char *message;
    int16_t *audio;
    sle_timing *timings;
} owned_event;

typedef enum conn_state { ST_CONNECTING, ST_OPEN, ST_READY, ST_CLOSED } conn_state;

struct sle_client {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* state changes and new events */
    sle_options opts;
    char *token;
    char *voice;
    char *ca_file;
    char *url;      /* the caller's URL, for messages */
    char *url_buf;  /* lws_parse_uri's cut-up copy */
    const char *host;
    const char *path_in_url;
    char *path;     /* "/" + path */
    int port;
    int tls;

    lws_retry_bo_t keepalive;
    struct lws_context *ctx; /* under mu once the thread runs; the thread destroys it */
    struct lws *wsi; /* service thread only */
    pthread_t thread;
    int thread_started;
    atomic_int stop;

    /* under mu */
    conn_state state;
    int want_close;
    sle_status fail_status; /* why the connection failed or closed */
    char last_error[512];
    out_msg *out_head, *out_tail;
    size_t out_bytes;
    owned_event *ev_head, *ev_tail;
    soxr_t in_rs;   /* caller rate -> 24 kHz int16 */
    int in_rate;
    int in_float;
    char *cancelled_response; /* deltas of this response are dropped */

    char *current_response;   /* the answer the server is producing (response.created .. done) */

    /* service thread only */
    char *rx;
    size_t rx_len, rx_cap;
    soxr_t out_rs;  /* 24 kHz -> output_sample_rate */
    atomic_int cancels_unanswered; /* response.cancel sent, no response.done or error for it yet */
};

/* WebSocket pings after keepalive_s of silence, hang-up after twice that: a server that
 * died without closing (power, network) is noticed. lws keeps the pointer: it lives in c. */
static const lws_retry_bo_t *keepalive_policy(sle_client *c) {
    if (c->opts.keepalive_s <= 0) return NULL;
    memset(&c->keepalive, 0, sizeof c->keepalive);
    c->keepalive.secs_since_valid_ping = (uint16_t)c->opts.keepalive_s;
    c->keepalive.secs_since_valid_hangup = (uint16_t)(2 * c->opts.keepalive_s);
    return &c->keepalive;
}

/* ---- errors ------------------------------------------------------------------------- */

const char *sle_strerror(sle_status status) {
    switch (status) {
    case SLE_OK: return "ok";
    case SLE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SLE_ERR_BAD_URL: return "malformed URL (expected ws://host[:port]/path or wss://...)";
    case SLE_ERR_CONNECT: return "could not connect to the server";
    case SLE_ERR_TIMEOUT: return "timed out";
    case SLE_ERR_UNAUTHORIZED: return "the server refused the token";
    case SLE_ERR_PROTOCOL: return "protocol error: the server's message is not the Realtime protocol";
    case SLE_ERR_CLOSED: return "the connection is closed";
    case SLE_ERR_SERVER: return "the server answered with an error";
    case SLE_ERR_NO_MEMORY: return "out of memory";
    case SLE_ERR_QUEUE_FULL: return "too much data waiting to be sent";
    case SLE_ERR_AUDIO: return "audio conversion failed";
    case SLE_ERR_INTERNAL: return "internal error";
    }
    return "unknown status code";
}

const char *sle_version(void) {
#define SLE_STR2(x) #x
#define SLE_STR(x) SLE_STR2(x)
    return SLE_STR(SLE_VERSION_MAJOR) "." SLE_STR(SLE_VERSION_MINOR) "." SLE_STR(SLE_VERSION_PATCH);
}

/* Records the message of a failure; caller holds mu. Returns status. */
static sle_status fail_locked(sle_client *c, sle_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
    va_end(ap);
    return status;
}

static sle_status fail(sle_client *c, sle_status status, const char *fmt, ...) {
    pthread_mutex_lock(&c->mu);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&c->mu);
    return status;
}

const char *sle_last_error(const sle_client *client) {
    if (!client) return "could not allocate the client (out of memory)";
    return client->last_error;
}

void sle_options_init(sle_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->struct_size = sizeof *o;
    o->output_modalities = SLE_MODALITY_AUDIO;
    o->server_vad = 1;
    o->silence_duration_ms = 0;
    o->prefix_padding_ms = -1;
    o->temperature = -1.0;
    o->top_p = -1.0;
    o->max_output_tokens = 0;
    o->output_sample_rate = PROTOCOL_RATE;
    o->connect_timeout_ms = 10000;
    o->keepalive_s = 10;
}

/* ---- events ------------------------------------------------------------------------- */

static owned_event *event_new(sle_event_type type) {
    owned_event *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->pub.type = type;
    e->pub.audio_ms = -1;
    e->pub.input_tokens = -1;
    e->pub.output_tokens = -1;
    return e;
}

void sle_event_free(sle_event *event) {
    if (!event) return;
    owned_event *e = (owned_event *)event;
    free(e->response_id);
    free(e->text);
    free(e->error_code);
    free(e->message);
    free(e->audio);
    if (e->timings) {
        for (size_t i = 0; i < e->pub.n_timings; i++) free((char *)e->timings[i].name);
        free(e->timings);
    }
    free(e);
}

double sle_event_timing(const sle_event *event, const char *name, double fallback) {
    if (!event || !name) return fallback;
    for (size_t i = 0; i < event->n_timings; i++)
        if (strcmp(event->timings[i].name, name) == 0) return event->timings[i].value;
    return fallback;
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* Hands an event to the callback (then frees it) or to the poll queue. Service thread. */
static void deliver(sle_client *c, owned_event *e) {
    if (!e) return;
    if (c->opts.on_event) {
        c->opts.on_event(&e->pub, c->opts.user_data);
        sle_event_free(&e->pub);
        return;
    }
    pthread_mutex_lock(&c->mu);
    if (c->ev_tail) c->ev_tail->next = e;
    else c->ev_head = e;
    c->ev_tail = e;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static void deliver_error(sle_client *c, sle_status status, const char *code, const char *message) {
    owned_event *e = event_new(SLE_EVENT_ERROR);
    if (!e) return;
    e->pub.error = status;
    e->error_code = dup_or_null(code);
    e->message = dup_or_null(message ? message : sle_strerror(status));
    e->pub.error_code = e->error_code;
    e->pub.message = e->message ? e->message : "";
    deliver(c, e);
}

/* ---- outgoing messages --------------------------------------------------------------- */

/* Queues a JSON message (takes ownership of `msg`); caller holds mu. */
static sle_status enqueue_json_locked(sle_client *c, cJSON *msg) {
    if (!msg) return fail_locked(c, SLE_ERR_NO_MEMORY, "out of memory building a message");
    if (c->state == ST_CLOSED || c->want_close) {
        cJSON_Delete(msg);
        return fail_locked(c, SLE_ERR_CLOSED, "the connection is closed%s%s", c->last_error[0] ? ": " : "",
                           c->last_error);
    }
    char *text = cJSON_PrintUnformatted(msg);
    cJSON_Delete(msg);
    if (!text) return fail_locked(c, SLE_ERR_NO_MEMORY, "out of memory serialising a message");
    size_t len = strlen(text);
    if (c->out_bytes + len > SLE_MAX_QUEUED_BYTES) {
        free(text);
        return fail_locked(c, SLE_ERR_QUEUE_FULL, "%zu bytes are waiting to be sent; the server is not reading",
                           c->out_bytes);
    }
    out_msg *m = malloc(sizeof *m + LWS_PRE + len);
    if (!m) {
        free(text);
        return fail_locked(c, SLE_ERR_NO_MEMORY, "out of memory queueing a message");
    }
    m->next = NULL;
    m->len = len;
    memcpy(m->buf + LWS_PRE, text, len);
    free(text);
    if (c->out_tail) c->out_tail->next = m;
    else c->out_head = m;
    c->out_tail = m;
    c->out_bytes += len;
    if (c->ctx) lws_cancel_service(c->ctx);
    return SLE_OK;
}

static cJSON *event_json(const char *type) {
    cJSON *o = cJSON_CreateObject();
    if (o && !cJSON_AddStringToObject(o, "type", type)) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* The session.update that carries the options (the Realtime GA session shape). */
static cJSON *session_update_json(const sle_client *c) {
    const sle_options *o = &c->opts;
    cJSON *msg = event_json("session.update");
    if (!msg) return NULL;
    cJSON *s = cJSON_AddObjectToObject(msg, "session");
    cJSON *mods = s ? cJSON_AddArrayToObject(s, "output_modalities") : NULL;
    cJSON *audio = s ? cJSON_AddObjectToObject(s, "audio") : NULL;
    cJSON *in = audio ? cJSON_AddObjectToObject(audio, "input") : NULL;
    cJSON *out = audio ? cJSON_AddObjectToObject(audio, "output") : NULL;
    cJSON *in_fmt = in ? cJSON_AddObjectToObject(in, "format") : NULL;
    cJSON *out_fmt = out ? cJSON_AddObjectToObject(out, "format") : NULL;
    if (!out_fmt || !in_fmt || !mods || !cJSON_AddStringToObject(s, "type", "realtime")) goto oom;
    if (o->output_modalities & SLE_MODALITY_AUDIO) cJSON_AddItemToArray(mods, cJSON_CreateString("audio"));
    if (o->output_modalities & SLE_MODALITY_TEXT) cJSON_AddItemToArray(mods, cJSON_CreateString("text"));
    cJSON_AddStringToObject(in_fmt, "type", "audio/pcm");
    cJSON_AddNumberToObject(in_fmt, "rate", PROTOCOL_RATE);
    cJSON_AddStringToObject(out_fmt, "type", "audio/pcm");
    cJSON_AddNumberToObject(out_fmt, "rate", PROTOCOL_RATE);
    if (o->server_vad) {
        cJSON *td = cJSON_AddObjectToObject(in, "turn_detection");
        if (!td) goto oom;
        cJSON_AddStringToObject(td, "type", "server_vad");
        if (o->silence_duration_ms > 0) cJSON_AddNumberToObject(td, "silence_duration_ms", o->silence_duration_ms);
        if (o->prefix_padding_ms >= 0) cJSON_AddNumberToObject(td, "prefix_padding_ms", o->prefix_padding_ms);
    } else {
        cJSON_AddNullToObject(in, "turn_detection");
    }
    if (c->voice) cJSON_AddStringToObject(out, "voice", c->voice);
    if (o->temperature >= 0) cJSON_AddNumberToObject(s, "temperature", o->temperature);
    if (o->top_p >= 0) cJSON_AddNumberToObject(s, "top_p", o->top_p);
    if (o->max_output_tokens > 0) cJSON_AddNumberToObject(s, "max_output_tokens", o->max_output_tokens);
    return msg;
oom:
    cJSON_Delete(msg);
    return NULL;
}

/* Queues 24 kHz PCM as input_audio_buffer.append messages; caller holds mu. */
static sle_status enqueue_pcm24_locked(sle_client *c, const int16_t *pcm, size_t n) {
    char b64[((APPEND_SAMPLES * 2 + 2) / 3) * 4 + 4];
    while (n > 0) {
        size_t k = n < APPEND_SAMPLES ? n : APPEND_SAMPLES;
        /* little-endian PCM16 on the wire; the protocol's byte order is the host's on every
         * target we build for (x86-64, aarch64), checked at configure time */
        int len = lws_b64_encode_string((const char *)pcm, (int)(k * 2), b64, (int)sizeof b64);
        if (len < 0) return fail_locked(c, SLE_ERR_INTERNAL, "base64 encoding failed");
        cJSON *msg = event_json("input_audio_buffer.append");
        if (msg && !cJSON_AddStringToObject(msg, "audio", b64)) {
            cJSON_Delete(msg);
            msg = NULL;
        }
        sle_status st = enqueue_json_locked(c, msg);
        if (st != SLE_OK) return st;
        pcm += k;
        n -= k;
    }
    return SLE_OK;
}

/* Pushes `n` input frames (or the resampler's tail when in == NULL) through soxr and
 * queues the 24 kHz result; caller holds mu. */
static sle_status resample_and_queue_locked(sle_client *c, const void *in, size_t n) {
    int16_t out[4096];
    const size_t elem = c->in_float ? sizeof(float) : sizeof(int16_t);
    const char *p = in;
    for (;;) {
        size_t idone = 0, odone = 0;
        soxr_error_t err = soxr_process(c->in_rs, p, in ? n : 0, &idone, out, sizeof out / sizeof out[0], &odone);
        if (err) return fail_locked(c, SLE_ERR_AUDIO, "resampling the input failed: %s", err);
        if (odone > 0) {
            sle_status st = enqueue_pcm24_locked(c, out, odone);
            if (st != SLE_OK) return st;
        }
        if (in) {
            p += idone * elem;
            n -= idone;
            if (n == 0 && odone < sizeof out / sizeof out[0]) return SLE_OK;
        } else if (odone == 0) {
            return SLE_OK;
        }
    }
}

/* Drains and drops the input resampler; caller holds mu. */
static sle_status flush_input_locked(sle_client *c) {
    if (!c->in_rs) return SLE_OK;
    sle_status st = resample_and_queue_locked(c, NULL, 0);
    soxr_delete(c->in_rs);
    c->in_rs = NULL;
    c->in_rate = 0;
    return st;
}

static sle_status send_audio(sle_client *c, const void *samples, size_t n, int rate, int is_float) {
    if (!c) return SLE_ERR_INVALID_ARGUMENT;
    if (!samples && n > 0) return fail(c, SLE_ERR_INVALID_ARGUMENT, "samples is NULL");
    if (rate < 8000 || rate > 192000)
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "sample rate %d Hz is outside 8000..192000", rate);
    pthread_mutex_lock(&c->mu);
    sle_status st = SLE_OK;
    if (c->state != ST_READY || c->want_close) {
        st = fail_locked(c, SLE_ERR_CLOSED, "the connection is closed%s%s", c->last_error[0] ? ": " : "",
                         c->last_error);
        goto out;
    }
    if (rate == PROTOCOL_RATE && !is_float) {
        st = flush_input_locked(c);
        if (st == SLE_OK) st = enqueue_pcm24_locked(c, samples, n);
        goto out;
    }
    if (c->in_rs && (c->in_rate != rate || c->in_float != is_float)) {
        st = flush_input_locked(c);
        if (st != SLE_OK) goto out;
    }
    if (!c->in_rs) {
        soxr_error_t err = NULL;
        soxr_io_spec_t io = soxr_io_spec(is_float ? SOXR_FLOAT32_I : SOXR_INT16_I, SOXR_INT16_I);
        soxr_quality_spec_t q = soxr_quality_spec(SOXR_HQ, 0);
        c->in_rs = soxr_create(rate, PROTOCOL_RATE, 1, &err, &io, &q, NULL);
        if (err || !c->in_rs) {
            st = fail_locked(c, SLE_ERR_AUDIO, "cannot create a %d -> %d Hz resampler: %s", rate, PROTOCOL_RATE,
                             err ? err : "unknown");
            c->in_rs = NULL;
            goto out;
        }
        c->in_rate = rate;
        c->in_float = is_float;
    }
    if (n > 0) st = resample_and_queue_locked(c, samples, n);
out:
    pthread_mutex_unlock(&c->mu);
    return st;
}

sle_status sle_send_audio_s16(sle_client *c, const int16_t *samples, size_t n, int sample_rate) {
    return send_audio(c, samples, n, sample_rate, 0);
}

sle_status sle_send_audio_f32(sle_client *c, const float *samples, size_t n, int sample_rate) {
    return send_audio(c, samples, n, sample_rate, 1);
}

static sle_status send_events(sle_client *c, const char *first, const char *second, int flush_audio) {
    if (!c) return SLE_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&c->mu);
    sle_status st = SLE_OK;
    if (c->state != ST_READY) {
        st = fail_locked(c, SLE_ERR_CLOSED, "the connection is closed%s%s", c->last_error[0] ? ": " : "",
                         c->last_error);
    } else {
        if (flush_audio) st = flush_input_locked(c);
        if (st == SLE_OK && first) st = enqueue_json_locked(c, event_json(first));
        if (st == SLE_OK && second) st = enqueue_json_locked(c, event_json(second));
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

sle_status sle_commit(sle_client *c) { return send_events(c, "input_audio_buffer.commit", "response.create", 1); }

sle_status sle_clear_audio(sle_client *c) {
    if (!c) return SLE_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&c->mu);
    if (c->in_rs) { /* the resampler's tail belongs to the cleared audio */
        soxr_delete(c->in_rs);
        c->in_rs = NULL;
        c->in_rate = 0;
    }
    pthread_mutex_unlock(&c->mu);
    return send_events(c, "input_audio_buffer.clear", NULL, 0);
}

sle_status sle_send_text(sle_client *c, const char *text) {
    if (!c) return SLE_ERR_INVALID_ARGUMENT;
    if (!text) return fail(c, SLE_ERR_INVALID_ARGUMENT, "text is NULL");
    cJSON *msg = event_json("conversation.item.create");
    cJSON *item = msg ? cJSON_AddObjectToObject(msg, "item") : NULL;
    cJSON *content = item ? cJSON_AddArrayToObject(item, "content") : NULL;
    cJSON *part = cJSON_CreateObject();
    if (!content || !part || !cJSON_AddStringToObject(item, "type", "message") ||
        !cJSON_AddStringToObject(item, "role", "user") || !cJSON_AddStringToObject(part, "type", "input_text") ||
        !cJSON_AddStringToObject(part, "text", text)) {
        cJSON_Delete(part);
        cJSON_Delete(msg);
        return fail(c, SLE_ERR_NO_MEMORY, "out of memory building a message");
    }
    cJSON_AddItemToArray(content, part);
    pthread_mutex_lock(&c->mu);
    sle_status st;
    if (c->state != ST_READY) {
        cJSON_Delete(msg);
        st = fail_locked(c, SLE_ERR_CLOSED, "the connection is closed%s%s", c->last_error[0] ? ": " : "",
                         c->last_error);
    } else {
        st = enqueue_json_locked(c, msg);
        if (st == SLE_OK) st = enqueue_json_locked(c, event_json("response.create"));
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

sle_status sle_cancel(sle_client *c) {
    if (!c) return SLE_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&c->mu);
    sle_status st;
    if (c->state != ST_READY) {
        st = fail_locked(c, SLE_ERR_CLOSED, "the connection is closed%s%s", c->last_error[0] ? ": " : "",
                         c->last_error);
    } else {
        /* drop what is still on the wire of the answer running now; with none running the
         * server answers response_cancel_not_active and no later answer is affected */
        free(c->cancelled_response);
        c->cancelled_response = dup_or_null(c->current_response);
        st = enqueue_json_locked(c, event_json("response.cancel"));
        if (st == SLE_OK) atomic_fetch_add(&c->cancels_unanswered, 1);
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

/* ---- incoming messages (service thread) ---------------------------------------------- */

static void set_state(sle_client *c, conn_state state, sle_status why, const char *fmt, ...) {
    pthread_mutex_lock(&c->mu);
    if (c->state != ST_CLOSED) {
        c->state = state;
        if (fmt) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
            va_end(ap);
        }
        if (why != SLE_OK) c->fail_status = why;
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static int is_dropped(sle_client *c, const char *response_id) {
    int dropped = 0;
    pthread_mutex_lock(&c->mu);
    dropped = c->cancelled_response && response_id && strcmp(c->cancelled_response, response_id) == 0;
    pthread_mutex_unlock(&c->mu);
    return dropped;
}

static const char *json_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Converts 24 kHz PCM (or the resampler's tail when pcm == NULL) to the output rate and
 * delivers it as one audio delta. */
static int deliver_audio(sle_client *c, const char *response_id, const int16_t *pcm, size_t n) {
    owned_event *e = event_new(SLE_EVENT_AUDIO_DELTA);
    if (!e) return -1;
    e->response_id = dup_or_null(response_id);
    e->pub.response_id = e->response_id;
    e->pub.sample_rate = c->opts.output_sample_rate;
    if (!c->out_rs) {
        if (!pcm || n == 0) {
            sle_event_free(&e->pub);
            return 0;
        }
        e->audio = malloc(n * sizeof *pcm);
        if (!e->audio) {
            sle_event_free(&e->pub);
            return -1;
        }
        memcpy(e->audio, pcm, n * sizeof *pcm);
        e->pub.audio_samples = n;
    } else {
        size_t cap = (size_t)((double)n * c->opts.output_sample_rate / PROTOCOL_RATE) + 1024;
        size_t used = 0;
        e->audio = malloc(cap * sizeof(int16_t));
        if (!e->audio) {
            sle_event_free(&e->pub);
            return -1;
        }
        for (;;) {
            size_t idone = 0, odone = 0;
            soxr_error_t err = soxr_process(c->out_rs, pcm, pcm ? n : 0, &idone, e->audio + used, cap - used, &odone);
            if (err) {
                sle_event_free(&e->pub);
                deliver_error(c, SLE_ERR_AUDIO, NULL, err);
                return 0;
            }
            used += odone;
            if (pcm) {
                pcm += idone;
                n -= idone;
            }
            if ((pcm ? n == 0 : odone == 0) && used < cap) break;
            if (used == cap) {
                int16_t *bigger = realloc(e->audio, 2 * cap * sizeof(int16_t));
                if (!bigger) {
                    sle_event_free(&e->pub);
                    return -1;
                }
                e->audio = bigger;
                cap *= 2;
            }
        }
        if (!pcm) soxr_clear(c->out_rs); /* ready for the next answer */
        e->pub.audio_samples = used;
        if (used == 0) {
            sle_event_free(&e->pub);
            return 0;
        }
    }
    e->pub.audio = e->audio;
    deliver(c, e);
    return 0;
}

static void handle_audio_delta(sle_client *c, const cJSON *msg) {
    const char *rid = json_str(msg, "response_id");
    const char *b64 = json_str(msg, "delta");
    if (!b64) {
        deliver_error(c, SLE_ERR_PROTOCOL, NULL, "response.output_audio.delta without a delta string");
        return;
    }
    if (is_dropped(c, rid)) return;
    size_t b64_len = strlen(b64);
    if (b64_len > INT_MAX) return;
    size_t cap = b64_len / 4 * 3 + 3;
    int16_t *pcm = malloc(cap + 1);
    if (!pcm) {
        deliver_error(c, SLE_ERR_NO_MEMORY, NULL, "out of memory decoding an audio delta");
        return;
    }
    int bytes = lws_b64_decode_string_len(b64, (int)b64_len, (char *)pcm, (int)cap + 1);
    if (bytes < 0 || bytes % 2) {
        free(pcm);
        deliver_error(c, SLE_ERR_PROTOCOL, NULL, "an audio delta is not base64 PCM16");
        return;
    }
    if (deliver_audio(c, rid, pcm, (size_t)bytes / 2) < 0)
        deliver_error(c, SLE_ERR_NO_MEMORY, NULL, "out of memory converting an audio delta");
    free(pcm);
}

static void handle_text_delta(sle_client *c, const cJSON *msg) {
    const char *rid = json_str(msg, "response_id");
    const char *delta = json_str(msg, "delta");
    if (!delta) {
        deliver_error(c, SLE_ERR_PROTOCOL, NULL, "a text delta without a delta string");
        return;
    }
    if (is_dropped(c, rid)) return;
    owned_event *e = event_new(SLE_EVENT_TEXT_DELTA);
    if (!e) return;
    e->response_id = dup_or_null(rid);
    e->text = strdup(delta);
    e->pub.response_id = e->response_id;
    e->pub.text = e->text;
    e->pub.text_len = e->text ? strlen(e->text) : 0;
    if (!e->text) {
        sle_event_free(&e->pub);
        return;
    }
    deliver(c, e);
}

/* Collects the numeric members of two objects (either may be NULL) as named timings. */
static void read_timings(owned_event *e, const cJSON *a, const cJSON *b) {
    const cJSON *objects[2] = {a, b};
    size_t n = 0;
    const cJSON *t;
    for (int k = 0; k < 2; k++)
        if (cJSON_IsObject(objects[k])) cJSON_ArrayForEach(t, objects[k]) if (cJSON_IsNumber(t) && t->string) n++;
    if (n == 0) return;
    e->timings = calloc(n, sizeof *e->timings);
    if (!e->timings) return;
    for (int k = 0; k < 2; k++) {
        if (!cJSON_IsObject(objects[k])) continue;
        cJSON_ArrayForEach(t, objects[k]) {
            if (!cJSON_IsNumber(t) || !t->string || e->pub.n_timings == n) continue;
            char *name = strdup(t->string);
            if (!name) return;
            e->timings[e->pub.n_timings].name = name;
            e->timings[e->pub.n_timings].value = t->valuedouble;
            e->pub.n_timings++;
        }
    }
    e->pub.timings = e->timings;
}

static void handle_response_done(sle_client *c, const cJSON *msg) {
    const cJSON *resp = cJSON_GetObjectItemCaseSensitive(msg, "response");
    if (!cJSON_IsObject(resp)) {
        deliver_error(c, SLE_ERR_PROTOCOL, NULL, "response.done without a response object");
        return;
    }
    const char *rid = json_str(resp, "id");
    /* the tail of the resampler belongs to this answer, unless it was cancelled */
    if (c->out_rs) {
        if (is_dropped(c, rid)) soxr_clear(c->out_rs);
        else deliver_audio(c, rid, NULL, 0);
    }
    owned_event *e = event_new(SLE_EVENT_RESPONSE_DONE);
    if (!e) return;
    e->response_id = dup_or_null(rid);
    e->pub.response_id = e->response_id;
    const char *status = json_str(resp, "status");
    if (!status || strcmp(status, "completed") == 0) e->pub.response_status = SLE_RESPONSE_COMPLETED;
    else if (strcmp(status, "cancelled") == 0) e->pub.response_status = SLE_RESPONSE_CANCELLED;
    else if (strcmp(status, "incomplete") == 0) e->pub.response_status = SLE_RESPONSE_INCOMPLETE;
    else e->pub.response_status = SLE_RESPONSE_FAILED;
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(resp, "usage");
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(usage, "input_tokens");
    const cJSON *ot = cJSON_GetObjectItemCaseSensitive(usage, "output_tokens");
    if (cJSON_IsNumber(it)) e->pub.input_tokens = (int64_t)it->valuedouble;
    if (cJSON_IsNumber(ot)) e->pub.output_tokens = (int64_t)ot->valuedouble;
    /* the server's extension of response.done (docs/protocol.md):
     * response.spiritlm = {audio_ms, first_audio_ms, total_ms, timings: {encode_s, ...}} */
    const cJSON *ext = cJSON_GetObjectItemCaseSensitive(resp, "spiritlm");
    if (cJSON_IsObject(ext)) read_timings(e, ext, cJSON_GetObjectItemCaseSensitive(ext, "timings"));
    pthread_mutex_lock(&c->mu);
    if (c->cancelled_response && rid && strcmp(c->cancelled_response, rid) == 0) {
        free(c->cancelled_response);
        c->cancelled_response = NULL;
    }
    free(c->current_response);
    c->current_response = NULL;
    pthread_mutex_unlock(&c->mu);
    if (e->pub.response_status == SLE_RESPONSE_CANCELLED && atomic_load(&c->cancels_unanswered) > 0)
        atomic_fetch_sub(&c->cancels_unanswered, 1);
    deliver(c, e);
}

static void handle_message(sle_client *c, const char *text, size_t len) {
    cJSON *msg = cJSON_ParseWithLength(text, len);
    const char *type = msg ? json_str(msg, "type") : NULL;
    if (!type) {
        deliver_error(c, SLE_ERR_PROTOCOL, NULL, msg ? "a server message without a type" : "a server message is not JSON");
        cJSON_Delete(msg);
        return;
    }
    pthread_mutex_lock(&c->mu);
    conn_state state = c->state;
    pthread_mutex_unlock(&c->mu);

    if (strcmp(type, "error") == 0) {
        const cJSON *err = cJSON_GetObjectItemCaseSensitive(msg, "error");
        const char *code = json_str(err, "code");
        const char *message = json_str(err, "message");
        if (state != ST_READY) {
            set_state(c, ST_CLOSED, SLE_ERR_SERVER, "the server refused the session: %s%s%s", message ? message : "",
                      code ? " " : "", code ? code : "");
            pthread_mutex_lock(&c->mu);
            c->want_close = 1;
            pthread_mutex_unlock(&c->mu);
        } else if (code && strcmp(code, "response_cancel_not_active") == 0 && c->cancels_unanswered > 0) {
            c->cancels_unanswered--; /* sle_cancel() with nothing running is harmless by contract */
        } else {
            deliver_error(c, SLE_ERR_SERVER, code, message ? message : "the server reported an error");
        }
    } else if (strcmp(type, "session.updated") == 0) {
        if (state == ST_OPEN) set_state(c, ST_READY, SLE_OK, NULL);
    } else if (strcmp(type, "input_audio_buffer.speech_started") == 0 ||
               strcmp(type, "input_audio_buffer.speech_stopped") == 0) {
        int started = strcmp(type, "input_audio_buffer.speech_started") == 0;
        owned_event *e = event_new(started ? SLE_EVENT_SPEECH_STARTED : SLE_EVENT_SPEECH_STOPPED);
        const cJSON *ms = cJSON_GetObjectItemCaseSensitive(msg, started ? "audio_start_ms" : "audio_end_ms");
        if (e && cJSON_IsNumber(ms)) e->pub.audio_ms = (int64_t)ms->valuedouble;
        deliver(c, e);
    } else if (strcmp(type, "response.created") == 0) {
        const char *rid = json_str(cJSON_GetObjectItemCaseSensitive(msg, "response"), "id");
        pthread_mutex_lock(&c->mu);
        free(c->current_response);
        c->current_response = dup_or_null(rid);
        pthread_mutex_unlock(&c->mu);
        if (c->out_rs) soxr_clear(c->out_rs);
        owned_event *e = event_new(SLE_EVENT_RESPONSE_STARTED);
        if (e) {
            e->response_id = dup_or_null(rid);
            e->pub.response_id = e->response_id;
        }
        deliver(c, e);
    } else if (strcmp(type, "response.output_audio.delta") == 0) {
        handle_audio_delta(c, msg);
    } else if (strcmp(type, "response.output_text.delta") == 0 ||
               strcmp(type, "response.output_audio_transcript.delta") == 0) {
        handle_text_delta(c, msg);
    } else if (strcmp(type, "response.done") == 0) {
        handle_response_done(c, msg);
    }
    /* session.created, conversation.item.*, input_audio_buffer.committed/cleared,
     * response.*.done, rate_limits.updated: nothing for the application */
    cJSON_Delete(msg);
}

/* ---- libwebsockets ------------------------------------------------------------------- */

static int on_lws(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len) {
    (void)user;
    sle_client *c = lws_context_user(lws_get_context(wsi));
    if (!c) return 0;
    switch (reason) {
    case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER:
        if (c->token) {
            unsigned char **p = (unsigned char **)in;
            unsigned char *end = *p + len;
            char value[1024];
            int n = snprintf(value, sizeof value, "Bearer %s", c->token);
            if (n < 0 || (size_t)n >= sizeof value ||
                lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_AUTHORIZATION, (unsigned char *)value, n, p, end))
                return -1;
        }
        break;
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR: {
        unsigned int http = lws_http_client_http_response(wsi);
        const char *why = in ? (const char *)in : "unknown reason";
        if (http == 401 || http == 403)
            set_state(c, ST_CLOSED, SLE_ERR_UNAUTHORIZED, "%s refused the token (HTTP %u)", c->url, http);
        else if (http >= 400)
            set_state(c, ST_CLOSED, SLE_ERR_CONNECT, "%s answered HTTP %u instead of a WebSocket", c->url, http);
        else
            set_state(c, ST_CLOSED, SLE_ERR_CONNECT, "cannot connect to %s: %s", c->url, why);
        c->wsi = NULL;
        atomic_store(&c->stop, 1);
        break;
    }
    case LWS_CALLBACK_CLIENT_ESTABLISHED: {
        pthread_mutex_lock(&c->mu);
        c->state = ST_OPEN;
        /* the session update goes first, before anything the caller queues */
        cJSON *update = session_update_json(c);
        char *text = update ? cJSON_PrintUnformatted(update) : NULL;
        cJSON_Delete(update);
        out_msg *m = text ? malloc(sizeof *m + LWS_PRE + strlen(text)) : NULL;
        if (m) {
            m->len = strlen(text);
            memcpy(m->buf + LWS_PRE, text, m->len);
            m->next = c->out_head;
            c->out_head = m;
            if (!c->out_tail) c->out_tail = m;
            c->out_bytes += m->len;
        }
        free(text);
        pthread_mutex_unlock(&c->mu);
        if (!m) {
            set_state(c, ST_CLOSED, SLE_ERR_NO_MEMORY, "out of memory building session.update");
            return -1;
        }
        lws_callback_on_writable(wsi);
        break;
    }
    case LWS_CALLBACK_CLIENT_RECEIVE:
        if (lws_frame_is_binary(wsi)) {
            deliver_error(c, SLE_ERR_PROTOCOL, NULL, "the server sent a binary frame");
            break;
        }
        if (c->rx_len + len > MAX_MESSAGE_BYTES) {
            deliver_error(c, SLE_ERR_PROTOCOL, NULL, "a server message is too large; closing");
            set_state(c, ST_CLOSED, SLE_ERR_PROTOCOL, "a server message exceeds %u bytes", MAX_MESSAGE_BYTES);
            return -1;
        }
        if (c->rx_len + len > c->rx_cap) {
            size_t cap = c->rx_cap ? c->rx_cap : 65536;
            while (cap < c->rx_len + len) cap *= 2;
            char *bigger = realloc(c->rx, cap);
            if (!bigger) return -1;
            c->rx = bigger;
            c->rx_cap = cap;
        }
        memcpy(c->rx + c->rx_len, in, len);
        c->rx_len += len;
        if (lws_is_final_fragment(wsi) && lws_remaining_packet_payload(wsi) == 0) {
            handle_message(c, c->rx, c->rx_len);
            c->rx_len = 0;
        }
        break;
    case LWS_CALLBACK_CLIENT_WRITEABLE: {
        pthread_mutex_lock(&c->mu);
        int closing = c->want_close;
        out_msg *m = closing ? NULL : c->out_head;
        if (m) {
            c->out_head = m->next;
            if (!c->out_head) c->out_tail = NULL;
            c->out_bytes -= m->len;
        }
        int more = c->out_head != NULL;
        pthread_mutex_unlock(&c->mu);
        if (closing) {
            lws_close_reason(wsi, LWS_CLOSE_STATUS_NORMAL, NULL, 0);
            return -1;
        }
        if (m) {
            int n = lws_write(wsi, m->buf + LWS_PRE, m->len, LWS_WRITE_TEXT);
            free(m);
            if (n < 0) {
                deliver_error(c, SLE_ERR_CLOSED, NULL, "writing to the server failed; the connection is closed");
                set_state(c, ST_CLOSED, SLE_ERR_CLOSED, "writing to %s failed", c->url);
                return -1;
            }
        }
        if (more) lws_callback_on_writable(wsi);
        break;
    }
    case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        if (c->wsi) {
            pthread_mutex_lock(&c->mu);
            int pending = c->out_head != NULL || c->want_close;
            pthread_mutex_unlock(&c->mu);
            if (pending) lws_callback_on_writable(c->wsi);
        }
        break;
    case LWS_CALLBACK_CLIENT_CLOSED: {
        pthread_mutex_lock(&c->mu);
        int by_us = c->want_close;
        conn_state was = c->state;
        pthread_mutex_unlock(&c->mu);
        c->wsi = NULL;
        if (was == ST_READY && !by_us) {
            /* the event first: once the state says closed, a poller may conclude nothing more comes */
            deliver_error(c, SLE_ERR_CLOSED, NULL, "the connection to the server is lost (closed, or no answer to pings)");
            set_state(c, ST_CLOSED, SLE_ERR_CLOSED, "the connection to %s is lost (closed, or no answer to pings)", c->url);
        } else {
            set_state(c, ST_CLOSED, SLE_ERR_CLOSED, was == ST_READY ? "closed" : "the server closed the connection "
                                                                                  "before the session was ready");
        }
        atomic_store(&c->stop, 1);
        break;
    }
    default:
        break;
    }
    return 0;
}

static const struct lws_protocols protocols[] = {
    {"spiritlm-edge-realtime", on_lws, 0, 65536, 0, NULL, 0},
    {NULL, NULL, 0, 0, 0, NULL, 0},
};

static void *service_main(void *arg) {
    sle_client *c = arg;
    while (!atomic_load(&c->stop)) {
        if (lws_service(c->ctx, 0) < 0) break;
    }
    /* the context dies on this thread, so that its last callbacks run here too */
    pthread_mutex_lock(&c->mu);
    struct lws_context *ctx = c->ctx;
    c->ctx = NULL;
    c->state = ST_CLOSED;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    lws_context_destroy(ctx);
    return NULL;
}

/* ---- connect / close ---------------------------------------------------------------- */

static void deadline_after(struct timespec *ts, int ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static sle_status parse_url(sle_client *c, const char *url) {
    if (strncmp(url, "ws://", 5) != 0 && strncmp(url, "wss://", 6) != 0)
        return fail(c, SLE_ERR_BAD_URL, "'%s' is not a ws:// or wss:// URL", url);
    c->url_buf = strdup(url);
    if (!c->url_buf) return fail(c, SLE_ERR_NO_MEMORY, "out of memory");
    const char *prot = NULL;
    if (lws_parse_uri(c->url_buf, &prot, &c->host, &c->port, &c->path_in_url) || !c->host || !c->host[0])
        return fail(c, SLE_ERR_BAD_URL, "'%s' has no host", url);
    for (const char *h = c->host; *h; h++)
        if (*h == ' ' || *h == '@' || *h == '/' || *h == '?' || *h == '#')
            return fail(c, SLE_ERR_BAD_URL, "'%s' has an invalid host", url);
    c->tls = strcmp(prot, "wss") == 0;
    /* lws_parse_uri falls back to 80/443 when the port is absent and leaves junk as 0 */
    const char *colon = strchr(url + (c->tls ? 6 : 5), ':');
    const char *slash = strchr(url + (c->tls ? 6 : 5), '/');
    if (colon && (!slash || colon < slash) && (c->port <= 0 || c->port > 65535))
        return fail(c, SLE_ERR_BAD_URL, "'%s' has an invalid port", url);
    if (c->port <= 0 || c->port > 65535) return fail(c, SLE_ERR_BAD_URL, "'%s' has an invalid port", url);
    size_t plen = strlen(c->path_in_url);
    c->path = malloc(plen + 2);
    if (!c->path) return fail(c, SLE_ERR_NO_MEMORY, "out of memory");
    c->path[0] = '/';
    memcpy(c->path + 1, c->path_in_url, plen + 1);
    return SLE_OK;
}

static void stop_thread(sle_client *c) {
    if (!c->thread_started) return;
    atomic_store(&c->stop, 1);
    pthread_mutex_lock(&c->mu);
    if (c->ctx) lws_cancel_service(c->ctx);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->thread, NULL);
    c->thread_started = 0;
}

static sle_status validate_options(sle_client *c, const sle_options *o) {
    if (o->struct_size < offsetof(sle_options, ca_file) + sizeof(const char *))
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "sle_options not initialised with sle_options_init()");
    if (o->output_modalities != SLE_MODALITY_AUDIO && o->output_modalities != SLE_MODALITY_TEXT &&
        o->output_modalities != (SLE_MODALITY_AUDIO | SLE_MODALITY_TEXT))
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "output_modalities must be SLE_MODALITY_AUDIO or SLE_MODALITY_TEXT");
    if (o->output_sample_rate < 8000 || o->output_sample_rate > 192000)
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "output_sample_rate %d is outside 8000..192000", o->output_sample_rate);
    if (o->connect_timeout_ms <= 0)
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "connect_timeout_ms must be positive");
    if (o->keepalive_s < 0 || o->keepalive_s > 3600)
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "keepalive_s must be within 0..3600");
    if (o->temperature > 2 || o->top_p == 0 || o->top_p > 1)
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "temperature must be within 0..2 and top_p within (0, 1]");
    return SLE_OK;
}

sle_status sle_connect(const char *url, const sle_options *options, sle_client **out) {
    if (!out) return SLE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    sle_client *c = calloc(1, sizeof *c);
    if (!c) return SLE_ERR_NO_MEMORY;
    pthread_mutex_init(&c->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    c->state = ST_CLOSED;
    *out = c;

    if (!url) return fail(c, SLE_ERR_BAD_URL, "url is NULL");
    sle_options defaults;
    sle_options_init(&defaults);
    if (options) {
        sle_status st = validate_options(c, options);
        if (st != SLE_OK) return st;
        /* copy what this version knows over the defaults: an older caller's missing fields keep
         * their defaults, a newer caller's extra fields are ignored */
        c->opts = defaults;
        memcpy(&c->opts, options, options->struct_size < sizeof c->opts ? options->struct_size : sizeof c->opts);
        c->opts.struct_size = sizeof c->opts;
    } else {
        c->opts = defaults;
    }
    if (!(c->url = strdup(url))) return fail(c, SLE_ERR_NO_MEMORY, "out of memory");
    if ((c->opts.token && !(c->token = strdup(c->opts.token))) || (c->opts.voice && !(c->voice = strdup(c->opts.voice))))
        return fail(c, SLE_ERR_NO_MEMORY, "out of memory");
    if (c->opts.ca_file && !(c->ca_file = strdup(c->opts.ca_file))) return fail(c, SLE_ERR_NO_MEMORY, "out of memory");
    c->opts.token = c->token;
    c->opts.voice = c->voice;
    c->opts.ca_file = c->ca_file;
    if (c->token && (strpbrk(c->token, "\r\n") || strlen(c->token) > 900))
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "the token must be one line of at most 900 bytes");
    sle_status st = parse_url(c, url);
    if (st != SLE_OK) return st;

    if (c->opts.output_sample_rate != PROTOCOL_RATE) {
        soxr_error_t err = NULL;
        soxr_io_spec_t io = soxr_io_spec(SOXR_INT16_I, SOXR_INT16_I);
        soxr_quality_spec_t q = soxr_quality_spec(SOXR_HQ, 0);
        c->out_rs = soxr_create(PROTOCOL_RATE, c->opts.output_sample_rate, 1, &err, &io, &q, NULL);
        if (err || !c->out_rs) {
            c->out_rs = NULL;
            return fail(c, SLE_ERR_AUDIO, "cannot create the output resampler: %s", err ? err : "unknown");
        }
    }

    lws_set_log_level(0, NULL); /* failures reach the caller as status codes and messages */
    const lws_retry_bo_t *policy = keepalive_policy(c);
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof info);
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.protocols = protocols;
    info.user = c;
    info.gid = -1;
    info.uid = -1;
    info.connect_timeout_secs = (unsigned)(c->opts.connect_timeout_ms + 999) / 1000;
    info.timeout_secs = info.connect_timeout_secs;
    info.fd_limit_per_thread = 8;
    if (c->tls) {
        info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
        info.client_ssl_ca_filepath = c->ca_file; /* NULL: the system's trust store */
    }
    c->ctx = lws_create_context(&info);
    if (!c->ctx) return fail(c, SLE_ERR_INTERNAL, "cannot create a libwebsockets context");

    struct lws_client_connect_info ci;
    memset(&ci, 0, sizeof ci);
    ci.context = c->ctx;
    ci.address = c->host;
    ci.port = c->port;
    ci.path = c->path;
    ci.host = c->host;
    ci.origin = NULL;
    ci.protocol = NULL;
    ci.ssl_connection = c->tls ? LCCSCF_USE_SSL : 0;
    ci.retry_and_idle_policy = policy;
    ci.pwsi = &c->wsi;
    pthread_mutex_lock(&c->mu);
    c->state = ST_CONNECTING;
    c->fail_status = SLE_OK;
    pthread_mutex_unlock(&c->mu);
    if (!lws_client_connect_via_info(&ci)) {
        /* the connection error callback has usually said why */
        pthread_mutex_lock(&c->mu);
        sle_status why = c->fail_status != SLE_OK ? c->fail_status : SLE_ERR_CONNECT;
        if (c->fail_status == SLE_OK) fail_locked(c, why, "cannot connect to %s", url);
        c->state = ST_CLOSED;
        pthread_mutex_unlock(&c->mu);
        return why;
    }
    if (pthread_create(&c->thread, NULL, service_main, c) != 0)
        return fail(c, SLE_ERR_INTERNAL, "cannot start the client thread: %s", strerror(errno));
    c->thread_started = 1;

    struct timespec deadline;
    deadline_after(&deadline, c->opts.connect_timeout_ms);
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    while (c->state != ST_READY && c->state != ST_CLOSED && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&c->cv, &c->mu, &deadline);
    conn_state state = c->state;
    sle_status why = c->fail_status;
    if (state != ST_READY) {
        c->state = ST_CLOSED;
        if (state != ST_CLOSED)
            fail_locked(c, SLE_ERR_TIMEOUT, "no session from %s within %d ms (the server did not answer)", url,
                        c->opts.connect_timeout_ms);
    }
    pthread_mutex_unlock(&c->mu);
    if (state == ST_READY) return SLE_OK;
    stop_thread(c);
    return state == ST_CLOSED ? (why != SLE_OK ? why : SLE_ERR_CONNECT) : SLE_ERR_TIMEOUT;
}

sle_status sle_close(sle_client *c) {
    if (!c) return SLE_ERR_INVALID_ARGUMENT;
    if (c->thread_started && pthread_equal(pthread_self(), c->thread)) /* from the callback: would join itself */
        return fail(c, SLE_ERR_INVALID_ARGUMENT, "sle_close() cannot be called from the event callback");
    pthread_mutex_lock(&c->mu);
    if (c->thread_started && c->state != ST_CLOSED) {
        c->want_close = 1;
        if (c->ctx) lws_cancel_service(c->ctx);
        struct timespec deadline;
        deadline_after(&deadline, CLOSE_WAIT_MS);
        int rc = 0;
        while (c->state != ST_CLOSED && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&c->cv, &c->mu, &deadline);
        c->state = ST_CLOSED;
    }
    pthread_mutex_unlock(&c->mu);
    stop_thread(c);
    return SLE_OK;
}

sle_status sle_poll(sle_client *c, int timeout_ms, sle_event **event) {
    if (!c || !event) return SLE_ERR_INVALID_ARGUMENT;
    *event = NULL;
    if (c->opts.on_event) return fail(c, SLE_ERR_INVALID_ARGUMENT, "this client delivers events to its callback");
    struct timespec deadline;
    if (timeout_ms > 0) deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&c->mu);
    sle_status st = SLE_OK;
    int rc = 0;
    while (!c->ev_head) {
        if (c->state == ST_CLOSED) {
            st = SLE_ERR_CLOSED;
            break;
        }
        if (timeout_ms == 0 || rc == ETIMEDOUT) {
            st = SLE_ERR_TIMEOUT;
            break;
        }
        rc = timeout_ms < 0 ? pthread_cond_wait(&c->cv, &c->mu) : pthread_cond_timedwait(&c->cv, &c->mu, &deadline);
    }
    if (c->ev_head) {
        owned_event *e = c->ev_head;
        c->ev_head = e->next;
        if (!c->ev_head) c->ev_tail = NULL;
        e->next = NULL;
        *event = &e->pub;
        st = SLE_OK;
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

void sle_destroy(sle_client *c) {
    if (!c) return;
    sle_close(c);
    if (c->ctx) lws_context_destroy(c->ctx);
    for (out_msg *m = c->out_head, *next; m; m = next) {
        next = m->next;
        free(m);
    }
    for (owned_event *e = c->ev_head, *next; e; e = next) {
        next = e->next;
        sle_event_free(&e->pub);
    }
    if (c->in_rs) soxr_delete(c->in_rs);
    if (c->out_rs) soxr_delete(c->out_rs);
    free(c->rx);
    free(c->current_response);
    free(c->cancelled_response);
    free(c->token);
    free(c->voice);
    free(c->ca_file);
    free(c->url);
    free(c->url_buf);
    free(c->path);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c);
}
