/*
 * talk: one spoken turn through `spiritlm-edge serve`.
 *
 *   talk [--token T] [--voice V] [--rate HZ] [--max-tokens N] URL question.wav answer.wav
 *
 * Reads the question (WAV, FLAC, ... anything libsndfile reads; mono or the first channel
 * mix), sends it as it is (the library resamples), ends the turn, prints the answer's text
 * as it streams and the time from the end of the question to the first audio, and writes
 * the spoken answer as 16-bit WAV at --rate (default 24000 Hz).
 */
#define _POSIX_C_SOURCE 200809L

#include <sndfile.h>
#include <spiritlm_edge/client.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Reads a sound file as mono float; returns NULL and prints why on failure. */
static float *read_mono(const char *path, size_t *frames, int *rate) {
    SF_INFO info;
    memset(&info, 0, sizeof info);
    SNDFILE *f = sf_open(path, SFM_READ, &info);
    if (!f) {
        fprintf(stderr, "talk: cannot read %s: %s\n", path, sf_strerror(NULL));
        return NULL;
    }
    size_t n = (size_t)info.frames, ch = (size_t)info.channels;
    float *inter = malloc(n * ch * sizeof *inter);
    float *mono = malloc((n ? n : 1) * sizeof *mono);
    if (!inter || !mono) {
        fprintf(stderr, "talk: out of memory reading %s\n", path);
        free(inter);
        free(mono);
        sf_close(f);
        return NULL;
    }
    n = (size_t)sf_readf_float(f, inter, (sf_count_t)n);
    sf_close(f);
    for (size_t i = 0; i < n; i++) {
        float sum = 0;
        for (size_t c = 0; c < ch; c++) sum += inter[i * ch + c];
        mono[i] = sum / (float)ch;
    }
    free(inter);
    *frames = n;
    *rate = info.samplerate;
    return mono;
}

static int usage(void) {
    fprintf(stderr, "usage: talk [--token T] [--voice V] [--rate HZ] [--max-tokens N] URL question.wav answer.wav\n");
    return 2;
}

int main(int argc, char **argv) {
    sle_options opts;
    sle_options_init(&opts);
    opts.server_vad = 0; /* the whole file is one turn: we commit it ourselves */
    const char *pos[3];
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--token") == 0) opts.token = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--voice") == 0) opts.voice = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--rate") == 0) opts.output_sample_rate = atoi(argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--max-tokens") == 0) opts.max_output_tokens = atoi(argv[++i]);
        else if (argv[i][0] == '-' || npos == 3) return usage();
        else pos[npos++] = argv[i];
    }
    if (npos != 3) return usage();

    size_t frames = 0;
    int in_rate = 0;
    float *question = read_mono(pos[1], &frames, &in_rate);
    if (!question) return 1;

    sle_client *client = NULL;
    sle_status st = sle_connect(pos[0], &opts, &client);
    if (st != SLE_OK) {
        fprintf(stderr, "talk: %s: %s\n", sle_strerror(st), sle_last_error(client));
        sle_destroy(client);
        free(question);
        return 1;
    }
    /* stream it in 100 ms pieces, as a microphone would (but without waiting) */
    size_t step = (size_t)in_rate / 10;
    for (size_t i = 0; i < frames && st == SLE_OK; i += step)
        st = sle_send_audio_f32(client, question + i, frames - i < step ? frames - i : step, in_rate);
    free(question);
    if (st == SLE_OK) st = sle_commit(client);
    double asked = now_s(), first_audio = -1;

    int16_t *answer = NULL;
    size_t answer_len = 0, answer_cap = 0;
    int ok = 0;
    sle_event *ev = NULL;
    while (st == SLE_OK && (st = sle_poll(client, 60000, &ev)) == SLE_OK) {
        if (ev->type == SLE_EVENT_TEXT_DELTA) {
            fwrite(ev->text, 1, ev->text_len, stdout);
            fflush(stdout);
        } else if (ev->type == SLE_EVENT_AUDIO_DELTA) {
            if (first_audio < 0) first_audio = now_s() - asked;
            if (answer_len + ev->audio_samples > answer_cap) {
                size_t cap = answer_cap ? answer_cap : 24000;
                while (cap < answer_len + ev->audio_samples) cap *= 2;
                int16_t *bigger = realloc(answer, cap * sizeof *answer);
                if (!bigger) {
                    fprintf(stderr, "talk: out of memory\n");
                    sle_event_free(ev);
                    break;
                }
                answer = bigger;
                answer_cap = cap;
            }
            memcpy(answer + answer_len, ev->audio, ev->audio_samples * sizeof *answer);
            answer_len += ev->audio_samples;
        } else if (ev->type == SLE_EVENT_ERROR) {
            fprintf(stderr, "\ntalk: %s: %s%s%s\n", sle_strerror(ev->error), ev->message,
                    ev->error_code ? " " : "", ev->error_code ? ev->error_code : "");
            sle_event_free(ev);
            break;
        } else if (ev->type == SLE_EVENT_RESPONSE_DONE) {
            printf("\n");
            if (first_audio >= 0) printf("time to first audio: %.0f ms (from the end of the question)\n", first_audio * 1e3);
            for (size_t i = 0; i < ev->n_timings; i++) printf("  server %s = %.4f\n", ev->timings[i].name, ev->timings[i].value);
            ok = ev->response_status == SLE_RESPONSE_COMPLETED || ev->response_status == SLE_RESPONSE_INCOMPLETE;
            if (!ok) fprintf(stderr, "talk: the answer did not complete (status %d)\n", (int)ev->response_status);
            sle_event_free(ev);
            break;
        }
        sle_event_free(ev);
    }
    if (st != SLE_OK) fprintf(stderr, "talk: %s: %s\n", sle_strerror(st), sle_last_error(client));
    sle_destroy(client);

    if (ok) {
        SF_INFO info;
        memset(&info, 0, sizeof info);
        info.samplerate = opts.output_sample_rate;
        info.channels = 1;
        info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
        SNDFILE *f = sf_open(pos[2], SFM_WRITE, &info);
        if (!f || sf_writef_short(f, answer, (sf_count_t)answer_len) != (sf_count_t)answer_len) {
            fprintf(stderr, "talk: cannot write %s: %s\n", pos[2], sf_strerror(f));
            ok = 0;
        } else {
            printf("wrote %s: %.2f s at %d Hz\n", pos[2], (double)answer_len / opts.output_sample_rate,
                   opts.output_sample_rate);
        }
        if (f) sf_close(f);
    }
    free(answer);
    return ok ? 0 : 1;
}
