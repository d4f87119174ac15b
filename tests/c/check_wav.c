/*
 * check_wav FILE RATE MIN_SECONDS: exits 0 when FILE is a mono 16-bit WAV at RATE Hz with at
 * least MIN_SECONDS of audio that is not silence (RMS above -50 dBFS). Reads with libsndfile.
 */
#include <math.h>
#include <sndfile.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: check_wav FILE RATE MIN_SECONDS\n");
        return 2;
    }
    SF_INFO info;
    memset(&info, 0, sizeof info);
    SNDFILE *f = sf_open(argv[1], SFM_READ, &info);
    if (!f) {
        fprintf(stderr, "check_wav: cannot read %s: %s\n", argv[1], sf_strerror(NULL));
        return 1;
    }
    int ok = 1;
    if ((info.format & SF_FORMAT_TYPEMASK) != SF_FORMAT_WAV || (info.format & SF_FORMAT_SUBMASK) != SF_FORMAT_PCM_16) {
        fprintf(stderr, "check_wav: %s is not 16-bit PCM WAV (format 0x%x)\n", argv[1], (unsigned)info.format);
        ok = 0;
    }
    if (info.channels != 1 || info.samplerate != atoi(argv[2])) {
        fprintf(stderr, "check_wav: %d channels at %d Hz, expected mono at %s\n", info.channels, info.samplerate, argv[2]);
        ok = 0;
    }
    double seconds = (double)info.frames / (info.samplerate > 0 ? info.samplerate : 1);
    if (seconds < atof(argv[3])) {
        fprintf(stderr, "check_wav: %.2f s of audio, expected at least %s\n", seconds, argv[3]);
        ok = 0;
    }
    double sum = 0;
    float buf[4096];
    sf_count_t n;
    while ((n = sf_readf_float(f, buf, (sf_count_t)(sizeof buf / sizeof buf[0]) / (info.channels ? info.channels : 1))) > 0)
        for (sf_count_t i = 0; i < n * info.channels; i++) sum += (double)buf[i] * buf[i];
    sf_close(f);
    double rms = info.frames ? sqrt(sum / ((double)info.frames * info.channels)) : 0;
    double dbfs = rms > 0 ? 20 * log10(rms) : -INFINITY;
    if (!(dbfs > -50)) {
        fprintf(stderr, "check_wav: silent (%.1f dBFS)\n", dbfs);
        ok = 0;
    }
    printf("check_wav: %s: %.2f s at %d Hz, %.1f dBFS: %s\n", argv[1], seconds, info.samplerate, dbfs, ok ? "ok" : "BAD");
    return ok ? 0 : 1;
}
