/*
 * ctest cases for the C client. One executable, one case per run:
 *
 *   test_client CASE [server.env]
 *
 * Cases without a server: bad_url, no_server, connect_timeout, http_401, bad_options.
 * Cases against `spiritlm-edge serve` (tests/c/server_fixture.py writes server.env):
 * speech_turn, speech_turn_resampled, speech_to_text, text_turn, callback_turn, cancel, wrong_token,
 * server_killed.
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sndfile.h>
#include <spiritlm_edge/client.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;

#define CHECK(cond, ...)                                                              \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                             \
            fprintf(stderr, "\n");                                                    \
            failures++;                                                               \
        }                                                                             \
    } while (0)

#define REQUIRE(cond, ...)    \
    do {                      \
        CHECK(cond, __VA_ARGS__); \
        if (!(cond)) return;  \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- the server's coordinates (server.env: KEY=VALUE lines) ------------------------ */

static char env_url[256], env_token[256], env_clip[1024], env_victim_url[256], env_fake_url[256], env_frozen_url[256];
static long env_victim_pid = 0, env_frozen_pid = 0;
static char env_tls_url[256], env_tls_ca[1024];

static int read_env(const char *path) {
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) {
        fprintf(stderr, "cannot read the server fixture's file %s (did the fixture start?)\n", path ? path : "(none)");
        return 0;
    }
    char line[1200];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        const char *v = eq + 1;
        if (strcmp(line, "URL") == 0) snprintf(env_url, sizeof env_url, "%s", v);
        else if (strcmp(line, "TOKEN") == 0) snprintf(env_token, sizeof env_token, "%s", v);
        else if (strcmp(line, "CLIP") == 0) snprintf(env_clip, sizeof env_clip, "%s", v);
        else if (strcmp(line, "VICTIM_URL") == 0) snprintf(env_victim_url, sizeof env_victim_url, "%s", v);
        else if (strcmp(line, "VICTIM_PID") == 0) env_victim_pid = atol(v);
        else if (strcmp(line, "FAKE_URL") == 0) snprintf(env_fake_url, sizeof env_fake_url, "%s", v);
        else if (strcmp(line, "FROZEN_URL") == 0) snprintf(env_frozen_url, sizeof env_frozen_url, "%s", v);
        else if (strcmp(line, "FROZEN_PID") == 0) env_frozen_pid = atol(v);
        else if (strcmp(line, "TLS_URL") == 0) snprintf(env_tls_url, sizeof env_tls_url, "%s", v);
        else if (strcmp(line, "TLS_CA") == 0) snprintf(env_tls_ca, sizeof env_tls_ca, "%s", v);
    }
    fclose(f);
    return env_url[0] != 0;
}

static sle_options server_options(void) {
    sle_options o;
    sle_options_init(&o);
    o.token = env_token[0] ? env_token : NULL;
    o.connect_timeout_ms = 30000;
    o.max_output_tokens = 40;
    o.temperature = 0.8;
    o.top_p = 0.95;
    o.voice = "1";
    return o;
}

/* The LibriSpeech clip as mono float at its own rate (16 kHz). */
static float *read_clip(size_t *frames, int *rate) {
    SF_INFO info;
    memset(&info, 0, sizeof info);
    SNDFILE *f = sf_open(env_clip, SFM_READ, &info);
    if (!f || info.channels != 1) {
        fprintf(stderr, "cannot read the clip %s\n", env_clip);
        if (f) sf_close(f);
        return NULL;
    }
    float *pcm = malloc((size_t)info.frames * sizeof *pcm);
    if (pcm) *frames = (size_t)sf_readf_float(f, pcm, info.frames);
    sf_close(f);
    *rate = info.samplerate;
    return pcm;
}

/* ---- a turn's events, collected ----------------------------------------------------- */

typedef struct turn {
    int started, speech_started, speech_stopped, done, errors;
    int order_ok;           /* no delta before response start or after done */
    size_t audio_samples, audio_deltas, text_bytes, text_deltas;
    double sum_sq;
    int sample_rate;
    sle_response_status status;
    size_t n_timings;
    double first_audio_s;   /* the server's timing, if sent */
    double server_audio_ms; /* how much audio the server says it sent */
    sle_status last_error;
    char text[4096];
} turn;

static void turn_init(turn *t) {
    memset(t, 0, sizeof *t);
    t->order_ok = 1;
    t->first_audio_s = -1;
}

static void turn_add(turn *t, const sle_event *ev) {
    if (getenv("SLE_TEST_VERBOSE"))
        fprintf(stderr, "    event %d %s samples %zu text '%.*s' status %d msg %s\n", (int)ev->type,
                ev->response_id ? ev->response_id : "-", ev->audio_samples, (int)ev->text_len, ev->text ? ev->text : "",
                (int)ev->response_status, ev->message ? ev->message : "");
    switch (ev->type) {
    case SLE_EVENT_SPEECH_STARTED: t->speech_started++; break;
    case SLE_EVENT_SPEECH_STOPPED: t->speech_stopped++; break;
    case SLE_EVENT_RESPONSE_STARTED: t->started++; break;
    case SLE_EVENT_AUDIO_DELTA:
        if (!t->started || t->done) t->order_ok = 0;
        t->audio_deltas++;
        t->audio_samples += ev->audio_samples;
        t->sample_rate = ev->sample_rate;
        for (size_t i = 0; i < ev->audio_samples; i++) t->sum_sq += (double)ev->audio[i] * ev->audio[i];
        break;
    case SLE_EVENT_TEXT_DELTA:
        if (!t->started || t->done) t->order_ok = 0;
        t->text_deltas++;
        if (t->text_bytes + ev->text_len < sizeof t->text) memcpy(t->text + t->text_bytes, ev->text, ev->text_len);
        t->text_bytes += ev->text_len;
        break;
    case SLE_EVENT_RESPONSE_DONE:
        if (!t->started) t->order_ok = 0;
        t->done++;
        t->status = ev->response_status;
        t->n_timings = ev->n_timings;
        t->first_audio_s = sle_event_timing(ev, "first_audio_s", -1);
        t->server_audio_ms = sle_event_timing(ev, "audio_ms", -1);
        break;
    case SLE_EVENT_ERROR:
        t->errors++;
        t->last_error = ev->error;
        fprintf(stderr, "  error event: %s: %s (%s)\n", sle_strerror(ev->error), ev->message,
                ev->error_code ? ev->error_code : "-");
        break;
    }
}

/* Polls until a response.done (or an error, or timeout_s). Returns 1 on done. */
static int run_until_done(sle_client *c, turn *t, double timeout_s) {
    double end = now_s() + timeout_s;
    while (now_s() < end) {
        sle_event *ev = NULL;
        sle_status st = sle_poll(c, 500, &ev);
        if (st == SLE_ERR_TIMEOUT) continue;
        if (st != SLE_OK) {
            fprintf(stderr, "  poll: %s: %s\n", sle_strerror(st), sle_last_error(c));
            return 0;
        }
        turn_add(t, ev);
        int stop = ev->type == SLE_EVENT_RESPONSE_DONE || ev->type == SLE_EVENT_ERROR;
        sle_event_free(ev);
        if (stop) return t->done > 0;
    }
    fprintf(stderr, "  no response.done within %.0f s\n", timeout_s);
    return 0;
}

static double rms(const turn *t) { return t->audio_samples ? sqrt(t->sum_sq / (double)t->audio_samples) : 0; }

/* ---- cases without a server --------------------------------------------------------- */

static void test_bad_url(void) {
    const char *bad[] = {"", "http://127.0.0.1:8765/v1/realtime", "ws://", "ws:///v1/realtime",
                         "ws://127.0.0.1:99999/v1/realtime", "ws://127.0.0.1:abc/v1/realtime",
                         "ws://bad host/v1/realtime", "127.0.0.1:8765", "wss://"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        sle_client *c = NULL;
        double t0 = now_s();
        sle_status st = sle_connect(bad[i], NULL, &c);
        CHECK(st == SLE_ERR_BAD_URL, "'%s' gave %s (%s)", bad[i], sle_strerror(st), sle_last_error(c));
        CHECK(c && strlen(sle_last_error(c)) > 0, "no message for '%s'", bad[i]);
        CHECK(now_s() - t0 < 1.0, "'%s' took %.2f s", bad[i], now_s() - t0);
        /* every call on a failed client answers, none crashes */
        int16_t pcm[16] = {0};
        CHECK(sle_send_audio_s16(c, pcm, 16, 16000) == SLE_ERR_CLOSED, "send on a failed client");
        CHECK(sle_commit(c) == SLE_ERR_CLOSED, "commit on a failed client");
        sle_event *ev = NULL;
        CHECK(sle_poll(c, 100, &ev) == SLE_ERR_CLOSED && ev == NULL, "poll on a failed client");
        CHECK(sle_close(c) == SLE_OK, "close on a failed client");
        sle_destroy(c);
    }
    sle_client *c = NULL;
    CHECK(sle_connect(NULL, NULL, &c) == SLE_ERR_BAD_URL, "NULL url");
    sle_destroy(c);
    CHECK(sle_connect("ws://127.0.0.1:1/", NULL, NULL) == SLE_ERR_INVALID_ARGUMENT, "NULL out");
    CHECK(sle_poll(NULL, 0, NULL) == SLE_ERR_INVALID_ARGUMENT, "NULL client");
    CHECK(strcmp(sle_last_error(NULL), "") != 0, "NULL client message");
    CHECK(strlen(sle_strerror((sle_status)-999)) > 0, "unknown status");
    sle_destroy(NULL);
}

static void test_bad_options(void) {
    sle_options o;
    sle_client *c = NULL;
    sle_options_init(&o);
    o.output_sample_rate = 1000;
    CHECK(sle_connect("ws://127.0.0.1:1/v1/realtime", &o, &c) == SLE_ERR_INVALID_ARGUMENT, "rate 1000");
    sle_destroy(c);
    sle_options_init(&o);
    o.output_modalities = 0;
    CHECK(sle_connect("ws://127.0.0.1:1/v1/realtime", &o, &c) == SLE_ERR_INVALID_ARGUMENT, "no modality");
    sle_destroy(c);
    sle_options_init(&o);
    o.token = "two\r\nlines";
    CHECK(sle_connect("ws://127.0.0.1:1/v1/realtime", &o, &c) == SLE_ERR_INVALID_ARGUMENT, "header injection");
    sle_destroy(c);
    memset(&o, 0, sizeof o); /* never initialised */
    CHECK(sle_connect("ws://127.0.0.1:1/v1/realtime", &o, &c) == SLE_ERR_INVALID_ARGUMENT, "uninitialised options");
    sle_destroy(c);
}

/* A loopback port with nothing listening. */
static int closed_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || getsockname(s, (struct sockaddr *)&a, &len)) return 1;
    close(s);
    return ntohs(a.sin_port);
}

/* A loopback listener; returns its socket and port. */
static int listener(int *port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4) ||
        getsockname(s, (struct sockaddr *)&a, &len))
        return -1;
    *port = ntohs(a.sin_port);
    return s;
}

static void test_no_server(void) {
    char url[128];
    snprintf(url, sizeof url, "ws://127.0.0.1:%d/v1/realtime", closed_port());
    sle_client *c = NULL;
    double t0 = now_s();
    sle_status st = sle_connect(url, NULL, &c);
    CHECK(st == SLE_ERR_CONNECT, "gave %s (%s)", sle_strerror(st), sle_last_error(c));
    CHECK(now_s() - t0 < 3.0, "took %.2f s", now_s() - t0);
    CHECK(strstr(sle_last_error(c), "127.0.0.1") != NULL, "message does not name the server: %s", sle_last_error(c));
    fprintf(stderr, "  message: %s\n", sle_last_error(c));
    sle_destroy(c);
}

static void test_connect_timeout(void) {
    int port = 0, s = listener(&port); /* accepts (the kernel does) but never answers */
    REQUIRE(s >= 0, "cannot listen on loopback");
    char url[128];
    snprintf(url, sizeof url, "ws://127.0.0.1:%d/v1/realtime", port);
    sle_options o;
    sle_options_init(&o);
    o.connect_timeout_ms = 1500;
    sle_client *c = NULL;
    double t0 = now_s();
    sle_status st = sle_connect(url, &o, &c);
    double took = now_s() - t0;
    CHECK(st == SLE_ERR_TIMEOUT, "gave %s (%s)", sle_strerror(st), sle_last_error(c));
    CHECK(took >= 1.4 && took < 3.5, "took %.2f s for a 1.5 s timeout", took);
    fprintf(stderr, "  message: %s (%.2f s)\n", sle_last_error(c), took);
    sle_destroy(c);
    close(s);
}

/* Answers one HTTP request with 401, as a server that refuses the token does. */
static void *answer_401(void *arg) {
    int s = *(int *)arg;
    int conn = accept(s, NULL, NULL);
    if (conn < 0) return NULL;
    char buf[4096];
    size_t got = 0;
    while (got < sizeof buf - 1) { /* read the request head */
        ssize_t n = read(conn, buf + got, sizeof buf - 1 - got);
        if (n <= 0) break;
        got += (size_t)n;
        buf[got] = 0;
        if (strstr(buf, "\r\n\r\n")) break;
    }
    const char *reply = "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
                        "Connection: close\r\n\r\nbad token.\r\n";
    ssize_t w = write(conn, reply, strlen(reply));
    (void)w;
    close(conn);
    return NULL;
}

static void test_http_401(void) {
    int port = 0, s = listener(&port);
    REQUIRE(s >= 0, "cannot listen on loopback");
    pthread_t th;
    pthread_create(&th, NULL, answer_401, &s);
    char url[128];
    snprintf(url, sizeof url, "ws://127.0.0.1:%d/v1/realtime", port);
    sle_options o;
    sle_options_init(&o);
    o.token = "wrong";
    o.connect_timeout_ms = 5000;
    sle_client *c = NULL;
    sle_status st = sle_connect(url, &o, &c);
    CHECK(st == SLE_ERR_UNAUTHORIZED, "gave %s (%s)", sle_strerror(st), sle_last_error(c));
    fprintf(stderr, "  message: %s\n", sle_last_error(c));
    sle_destroy(c);
    pthread_join(th, NULL);
    close(s);
}

/* ---- cases against the server -------------------------------------------------------- */

static sle_client *connect_or_report(const char *url, const sle_options *o) {
    sle_client *c = NULL;
    sle_status st = sle_connect(url, o, &c);
    if (st != SLE_OK) {
        fprintf(stderr, "connect %s: %s: %s\n", url, sle_strerror(st), sle_last_error(c));
        failures++;
        sle_destroy(c);
        return NULL;
    }
    return c;
}

/* A spoken turn with server VAD: the clip, then silence; the server ends the turn. */
static void spoken_turn(int input_rate, int input_float, int output_rate, int modalities) {
    size_t frames = 0;
    int rate = 0;
    float *clip = read_clip(&frames, &rate);
    REQUIRE(clip, "no clip");
    sle_options o = server_options();
    o.output_sample_rate = output_rate;
    o.output_modalities = modalities;
    o.silence_duration_ms = 2000; /* the clip pauses for 1.6 s mid-sentence: one turn, not two */
    sle_client *c = connect_or_report(env_url, &o);
    if (!c) {
        free(clip);
        return;
    }
    /* the clip at the rate under test, made without the library's resampler (a test must not
     * check the library with itself): 16 kHz -> 48 kHz by sample repetition is still speech */
    size_t factor = (size_t)(input_rate / rate);
    REQUIRE(factor >= 1 && (size_t)rate * factor == (size_t)input_rate, "rate %d", input_rate);
    size_t n = frames * factor;
    float *f32 = malloc(n * sizeof *f32);
    int16_t *s16 = malloc(n * sizeof *s16);
    REQUIRE(f32 && s16, "oom");
    for (size_t i = 0; i < n; i++) {
        f32[i] = clip[i / factor];
        s16[i] = (int16_t)lrintf(f32[i] * 32767.0f);
    }
    size_t step = (size_t)input_rate / 10;
    sle_status st = SLE_OK;
    for (size_t i = 0; i < n && st == SLE_OK; i += step) {
        size_t k = n - i < step ? n - i : step;
        st = input_float ? sle_send_audio_f32(c, f32 + i, k, input_rate) : sle_send_audio_s16(c, s16 + i, k, input_rate);
    }
    /* three seconds of silence end the turn */
    memset(s16, 0, step * sizeof *s16);
    for (int i = 0; i < 30 && st == SLE_OK; i++) st = sle_send_audio_s16(c, s16, step, input_rate);
    CHECK(st == SLE_OK, "sending audio: %s: %s", sle_strerror(st), sle_last_error(c));
    turn t;
    turn_init(&t);
    int done = run_until_done(c, &t, 120);
    CHECK(done, "no response.done");
    CHECK(t.speech_started >= 1 && t.speech_stopped >= 1, "VAD events: started %d stopped %d", t.speech_started,
          t.speech_stopped);
    CHECK(t.errors == 0, "%d error events", t.errors);
    CHECK(t.order_ok, "events out of order");
    CHECK(t.status == SLE_RESPONSE_COMPLETED || t.status == SLE_RESPONSE_INCOMPLETE, "status %d", (int)t.status);
    CHECK(t.n_timings > 0, "response.done carried no timings");
    if (modalities & SLE_MODALITY_AUDIO) {
        CHECK(t.audio_deltas > 0 && t.audio_samples > (size_t)output_rate / 10, "audio: %zu deltas, %zu samples",
              t.audio_deltas, t.audio_samples);
        CHECK(t.sample_rate == output_rate, "sample rate %d", t.sample_rate);
        CHECK(rms(&t) > 30.0, "silent answer (RMS %.1f)", rms(&t));
        /* the length after resampling matches what the server says it sent (soxr's tail is flushed) */
        double got_ms = 1000.0 * (double)t.audio_samples / output_rate;
        CHECK(fabs(got_ms - t.server_audio_ms) < 25.0, "%.1f ms of audio received, the server sent %.1f ms", got_ms,
              t.server_audio_ms);
    } else {
        CHECK(t.text_deltas > 0 && t.audio_deltas == 0, "text answer: %zu text deltas, %zu audio deltas",
              t.text_deltas, t.audio_deltas);
    }
    fprintf(stderr, "  answer: %zu samples at %d Hz, RMS %.0f, %zu text bytes, server first_audio_s %.3f\n",
            t.audio_samples, t.sample_rate, rms(&t), t.text_bytes, t.first_audio_s);
    free(f32);
    free(s16);
    free(clip);
    sle_destroy(c);
}

static void test_text_turn(void) {
    sle_options o = server_options();
    o.output_modalities = SLE_MODALITY_TEXT;
    sle_client *c = connect_or_report(env_url, &o);
    if (!c) return;
    for (int k = 0; k < 2; k++) { /* two turns on one connection: the conversation goes on */
        CHECK(sle_send_text(c, k ? "And then?" : "The capital of France is") == SLE_OK, "send_text: %s",
              sle_last_error(c));
        turn t;
        turn_init(&t);
        CHECK(run_until_done(c, &t, 60), "turn %d: no response.done", k);
        CHECK(t.errors == 0 && t.order_ok, "turn %d: errors %d order %d", k, t.errors, t.order_ok);
        CHECK(t.text_deltas > 0 && t.text_bytes > 0, "turn %d: no text", k);
        CHECK(t.audio_deltas == 0, "turn %d: audio in a text answer", k);
        fprintf(stderr, "  text turn %d: %zu deltas: %.60s\n", k, t.text_deltas, t.text);
    }
    sle_destroy(c);
}

typedef struct cb_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    turn t;
    int done;
    pthread_t thread;
} cb_state;

static void on_event(const sle_event *ev, void *user) {
    cb_state *s = user;
    pthread_mutex_lock(&s->mu);
    turn_add(&s->t, ev);
    s->thread = pthread_self();
    if (ev->type == SLE_EVENT_RESPONSE_DONE || ev->type == SLE_EVENT_ERROR) s->done = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void test_callback_turn(void) {
    cb_state s;
    memset(&s, 0, sizeof s);
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    turn_init(&s.t);
    sle_options o = server_options();
    o.on_event = on_event;
    o.user_data = &s;
    o.output_sample_rate = 16000;
    sle_client *c = connect_or_report(env_url, &o);
    if (!c) return;
    sle_event *ev = NULL;
    CHECK(sle_poll(c, 0, &ev) == SLE_ERR_INVALID_ARGUMENT, "poll on a callback client");
    CHECK(sle_send_text(c, "Hello there.") == SLE_OK, "send_text: %s", sle_last_error(c));
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 60;
    pthread_mutex_lock(&s.mu);
    while (!s.done && pthread_cond_timedwait(&s.cv, &s.mu, &dl) == 0) {
    }
    CHECK(s.done && s.t.done == 1 && s.t.errors == 0 && s.t.order_ok, "done %d errors %d", s.t.done, s.t.errors);
    CHECK(s.t.audio_samples > 0 && s.t.sample_rate == 16000, "audio %zu at %d", s.t.audio_samples, s.t.sample_rate);
    CHECK(!pthread_equal(s.thread, pthread_self()), "callback ran on the caller's thread");
    pthread_mutex_unlock(&s.mu);
    sle_destroy(c);
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
}

/* Cancel on the first audio delta: the answer stops, and the next turn works. */
static void test_cancel(void) {
    sle_options o = server_options();
    o.server_vad = 0;
    o.max_output_tokens = 1000; /* long enough to still be running when cancelled */
    sle_client *c = connect_or_report(env_url, &o);
    if (!c) return;
    CHECK(sle_cancel(c) == SLE_OK, "cancel with nothing running");
    CHECK(sle_send_text(c, "Tell me a long story.") == SLE_OK, "send_text");
    turn t;
    turn_init(&t);
    int cancelled = 0;
    size_t deltas_after_cancel = 0;
    double cancelled_at = 0, end = now_s() + 90;
    while (now_s() < end && !t.done) {
        sle_event *ev = NULL;
        sle_status st = sle_poll(c, 500, &ev);
        if (st == SLE_ERR_TIMEOUT) continue;
        if (st != SLE_OK) break;
        if (cancelled && (ev->type == SLE_EVENT_AUDIO_DELTA || ev->type == SLE_EVENT_TEXT_DELTA)) deltas_after_cancel++;
        turn_add(&t, ev);
        if (ev->type == SLE_EVENT_AUDIO_DELTA && !cancelled) {
            CHECK(sle_cancel(c) == SLE_OK, "cancel: %s", sle_last_error(c));
            cancelled = 1;
            cancelled_at = now_s();
        }
        if (ev->type == SLE_EVENT_RESPONSE_DONE && cancelled) /* generation stops within a decode step */
            CHECK(now_s() - cancelled_at < 5.0, "response.done came %.1f s after the cancel", now_s() - cancelled_at);
        int err = ev->type == SLE_EVENT_ERROR;
        sle_event_free(ev);
        if (err) break;
    }
    CHECK(cancelled, "no audio came to cancel");
    CHECK(t.done == 1, "no response.done after cancel");
    CHECK(t.status == SLE_RESPONSE_CANCELLED, "status %d, not cancelled", (int)t.status);
    CHECK(deltas_after_cancel == 0, "%zu deltas delivered after cancel", deltas_after_cancel);
    /* the next turn works */
    CHECK(sle_send_text(c, "Hello.") == SLE_OK, "send_text after cancel");
    turn t2;
    turn_init(&t2);
    CHECK(run_until_done(c, &t2, 60), "the turn after cancel did not finish");
    CHECK(t2.status != SLE_RESPONSE_CANCELLED && t2.audio_samples > 0 && t2.errors == 0,
          "turn after cancel: status %d, %zu samples", (int)t2.status, t2.audio_samples);
    sle_destroy(c);
}

static void test_wrong_token(void) {
    sle_options o = server_options();
    o.token = "not-the-token";
    sle_client *c = NULL;
    double t0 = now_s();
    sle_status st = sle_connect(env_url, &o, &c);
    CHECK(st == SLE_ERR_UNAUTHORIZED, "gave %s (%s)", sle_strerror(st), sle_last_error(c));
    CHECK(now_s() - t0 < 5, "took %.1f s", now_s() - t0);
    fprintf(stderr, "  message: %s\n", sle_last_error(c));
    sle_destroy(c);
    o.token = NULL;
    st = sle_connect(env_url, &o, &c);
    CHECK(st == SLE_ERR_UNAUTHORIZED, "no token gave %s (%s)", sle_strerror(st), sle_last_error(c));
    sle_destroy(c);
}

/* The victim server is SIGKILLed on the first audio delta: an error event, then CLOSED. */
static void test_server_killed(void) {
    REQUIRE(env_victim_pid > 0 && env_victim_url[0], "no victim server in server.env");
    sle_options o = server_options();
    o.server_vad = 0;
    o.max_output_tokens = 1000;
    o.keepalive_s = 2;
    sle_client *c = connect_or_report(env_victim_url, &o);
    if (!c) return;
    CHECK(sle_send_text(c, "Tell me a long story.") == SLE_OK, "send_text");
    int killed = 0, closed_error = 0;
    double killed_at = 0, end = now_s() + 90;
    sle_status st = SLE_OK;
    while (now_s() < end) {
        sle_event *ev = NULL;
        st = sle_poll(c, 500, &ev);
        if (st == SLE_ERR_TIMEOUT) continue;
        if (st != SLE_OK) break;
        if (ev->type == SLE_EVENT_AUDIO_DELTA && !killed) {
            CHECK(kill((pid_t)env_victim_pid, SIGKILL) == 0, "kill %ld", env_victim_pid);
            killed = 1;
            killed_at = now_s();
        }
        if (ev->type == SLE_EVENT_ERROR && ev->error == SLE_ERR_CLOSED) closed_error = 1;
        sle_event_free(ev);
    }
    CHECK(killed, "no audio before the kill");
    CHECK(st == SLE_ERR_CLOSED, "poll ended with %s", sle_strerror(st));
    CHECK(closed_error, "no SLE_ERR_CLOSED error event");
    CHECK(now_s() - killed_at < 10, "noticed after %.1f s", now_s() - killed_at);
    int16_t pcm[160] = {0};
    CHECK(sle_send_audio_s16(c, pcm, 160, 16000) == SLE_ERR_CLOSED, "send after the server died");
    CHECK(sle_send_text(c, "hello?") == SLE_ERR_CLOSED, "send_text after the server died");
    fprintf(stderr, "  after the kill: %s\n", sle_last_error(c));
    sle_destroy(c);
}

/* A server that breaks the protocol (tests/c/fake_server.py): error codes and messages, the
 * connection stays usable where it can, nothing hangs past the stated timeouts. */
static void test_protocol_errors(void) {
    REQUIRE(env_fake_url[0], "no fake server in server.env");
    char url[300];
    sle_options o;
    sle_client *c = NULL;

    /* garbage after a good session: one SLE_ERR_PROTOCOL event each, then a turn still works */
    snprintf(url, sizeof url, "%s/garbage", env_fake_url);
    sle_options_init(&o);
    o.output_sample_rate = 48000;
    sle_status st = sle_connect(url, &o, &c);
    REQUIRE(st == SLE_OK, "connect: %s", sle_last_error(c));
    int protocol = 0, server = 0;
    for (int i = 0; i < 5; i++) {
        sle_event *ev = NULL;
        st = sle_poll(c, 5000, &ev);
        REQUIRE(st == SLE_OK, "event %d: %s", i, sle_strerror(st));
        CHECK(ev->type == SLE_EVENT_ERROR && ev->message && ev->message[0], "event %d is type %d", i, (int)ev->type);
        if (ev->error == SLE_ERR_PROTOCOL) protocol++;
        if (ev->error == SLE_ERR_SERVER && ev->error_code && strcmp(ev->error_code, "unknown_event") == 0) server++;
        fprintf(stderr, "  %s: %s\n", sle_strerror(ev->error), ev->message);
        sle_event_free(ev);
    }
    CHECK(protocol == 4 && server == 1, "%d protocol errors, %d server errors", protocol, server);
    CHECK(sle_send_text(c, "still there?") == SLE_OK, "send_text after garbage: %s", sle_last_error(c));
    turn t;
    turn_init(&t);
    CHECK(run_until_done(c, &t, 10) && t.status == SLE_RESPONSE_COMPLETED, "no turn after garbage");
    /* 2400 samples at 24 kHz = 100 ms -> 4800 at 48 kHz, the resampler's tail included */
    CHECK(t.audio_samples >= 4790 && t.audio_samples <= 4810 && t.sample_rate == 48000, "%zu samples at %d Hz",
          t.audio_samples, t.sample_rate);
    sle_destroy(c);

    /* a WebSocket that never says anything: the connect timeout holds */
    snprintf(url, sizeof url, "%s/silent", env_fake_url);
    sle_options_init(&o);
    o.connect_timeout_ms = 1000;
    double t0 = now_s();
    st = sle_connect(url, &o, &c);
    CHECK(st == SLE_ERR_TIMEOUT && now_s() - t0 < 2.5, "silent: %s after %.1f s", sle_strerror(st), now_s() - t0);
    sle_destroy(c);

    /* the server refuses the session: its message reaches the caller */
    snprintf(url, sizeof url, "%s/refuse", env_fake_url);
    st = sle_connect(url, NULL, &c);
    CHECK(st == SLE_ERR_SERVER && strstr(sle_last_error(c), "voice '9'"), "refuse: %s: %s", sle_strerror(st),
          sle_last_error(c));
    sle_destroy(c);

    /* the server closes with 1011: an SLE_ERR_CLOSED event, then poll says closed */
    snprintf(url, sizeof url, "%s/close", env_fake_url);
    st = sle_connect(url, NULL, &c);
    REQUIRE(st == SLE_OK, "close: connect: %s", sle_last_error(c));
    CHECK(sle_send_text(c, "hello") == SLE_OK, "send_text");
    sle_event *ev = NULL;
    st = sle_poll(c, 5000, &ev);
    CHECK(st == SLE_OK && ev && ev->type == SLE_EVENT_ERROR && ev->error == SLE_ERR_CLOSED, "close: %s",
          sle_strerror(st));
    sle_event_free(ev);
    ev = NULL;
    CHECK(sle_poll(c, 5000, &ev) == SLE_ERR_CLOSED, "close: poll after the close event");
    sle_event_free(ev);
    sle_destroy(c);

    /* a 9 MiB message: a protocol error, the connection closed, no unbounded buffering */
    snprintf(url, sizeof url, "%s/huge", env_fake_url);
    st = sle_connect(url, NULL, &c);
    REQUIRE(st == SLE_OK, "huge: connect: %s", sle_last_error(c));
    ev = NULL;
    st = sle_poll(c, 10000, &ev);
    CHECK(st == SLE_OK && ev && ev->type == SLE_EVENT_ERROR && ev->error == SLE_ERR_PROTOCOL, "huge: %s",
          sle_strerror(st));
    sle_event_free(ev);
    ev = NULL;
    CHECK(sle_poll(c, 10000, &ev) == SLE_ERR_CLOSED, "huge: the connection is still open");
    sle_event_free(ev);
    sle_destroy(c);
}

/* A server that freezes (SIGSTOP: no FIN, no RST, nothing) is noticed by the WebSocket
 * keep-alive: an SLE_ERR_CLOSED event within about twice keepalive_s, not a hang. */
static void test_server_frozen(void) {
    REQUIRE(env_frozen_pid > 0 && env_frozen_url[0], "no frozen server in server.env");
    sle_options o;
    sle_options_init(&o);
    o.keepalive_s = 2;
    sle_client *c = NULL;
    sle_status st = sle_connect(env_frozen_url, &o, &c);
    REQUIRE(st == SLE_OK, "connect: %s", sle_last_error(c));
    REQUIRE(kill((pid_t)env_frozen_pid, SIGSTOP) == 0, "SIGSTOP %ld", env_frozen_pid);
    double t0 = now_s();
    CHECK(sle_send_text(c, "are you there?") == SLE_OK, "send_text");
    int closed_event = 0;
    sle_event *ev = NULL;
    while ((st = sle_poll(c, 15000, &ev)) == SLE_OK) {
        if (ev->type == SLE_EVENT_ERROR && ev->error == SLE_ERR_CLOSED) closed_event = 1;
        sle_event_free(ev);
    }
    double took = now_s() - t0;
    kill((pid_t)env_frozen_pid, SIGCONT);
    CHECK(st == SLE_ERR_CLOSED && closed_event, "poll ended with %s, close event %d", sle_strerror(st), closed_event);
    CHECK(took > 1.5 && took < 8.0, "noticed after %.1f s with a 2 s keep-alive", took);
    fprintf(stderr, "  frozen server noticed after %.1f s: %s\n", took, sle_last_error(c));
    sle_destroy(c);
}

/* wss:// to a server with a self-signed certificate: trusted through ca_file, a text turn
 * works; without it the certificate is refused (SLE_ERR_CONNECT, not a silent downgrade). */
static void test_tls(void) {
    REQUIRE(env_tls_url[0] && env_tls_ca[0], "no TLS server in server.env");
    sle_options o = server_options();
    o.output_modalities = SLE_MODALITY_TEXT;
    o.ca_file = env_tls_ca;
    sle_client *c = connect_or_report(env_tls_url, &o);
    if (c) {
        CHECK(sle_send_text(c, "Hello over TLS.") == SLE_OK, "send_text");
        turn t;
        turn_init(&t);
        CHECK(run_until_done(c, &t, 60) && t.text_deltas > 0 && t.errors == 0, "no text answer over TLS");
        sle_destroy(c);
    }
    o.ca_file = NULL; /* the system's trust store does not know the self-signed certificate */
    sle_status st = sle_connect(env_tls_url, &o, &c);
    CHECK(st == SLE_ERR_CONNECT, "untrusted certificate gave %s (%s)", sle_strerror(st), sle_last_error(c));
    fprintf(stderr, "  untrusted: %s\n", sle_last_error(c));
    sle_destroy(c);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        fprintf(stderr, "usage: test_client CASE [server.env]\n");
        return 2;
    }
    const char *name = argv[1];
    struct {
        const char *name;
        void (*fn)(void);
        int needs_server;
    } cases[] = {
        {"bad_url", test_bad_url, 0},
        {"bad_options", test_bad_options, 0},
        {"no_server", test_no_server, 0},
        {"connect_timeout", test_connect_timeout, 0},
        {"http_401", test_http_401, 0},
        {"text_turn", test_text_turn, 1},
        {"callback_turn", test_callback_turn, 1},
        {"cancel", test_cancel, 1},
        {"wrong_token", test_wrong_token, 1},
        {"server_killed", test_server_killed, 1},
        {"protocol_errors", test_protocol_errors, 1},
        {"server_frozen", test_server_frozen, 1},
        {"tls", test_tls, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (strcmp(cases[i].name, name) != 0) continue;
        if (cases[i].needs_server && !read_env(argc > 2 ? argv[2] : NULL)) return 1;
        cases[i].fn();
        fprintf(stderr, "%s: %s\n", name, failures ? "FAILED" : "ok");
        return failures ? 1 : 0;
    }
    if (strncmp(name, "speech_", 7) == 0) {
        if (!read_env(argc > 2 ? argv[2] : NULL)) return 1;
        if (strcmp(name, "speech_turn") == 0) spoken_turn(16000, 0, 24000, SLE_MODALITY_AUDIO); /* int16 16 kHz -> 24 kHz */
        else if (strcmp(name, "speech_turn_resampled") == 0) spoken_turn(48000, 1, 48000, SLE_MODALITY_AUDIO); /* f32 */
        else if (strcmp(name, "speech_to_text") == 0) spoken_turn(16000, 1, 24000, SLE_MODALITY_TEXT);
        else return 2;
        fprintf(stderr, "%s: %s\n", name, failures ? "FAILED" : "ok");
        return failures ? 1 : 0;
    }
    fprintf(stderr, "unknown case %s\n", name);
    return 2;
}
