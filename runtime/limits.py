"""The longest inputs a GPU engine is built for, shared by the engines that cut their work
to fit (the vocoder's windows) and the TensorRT shape profiles (``trt_engine.profile_shapes``).

One maximum for every GPU path: 30 s. An engine reserves activation memory for its largest
shapes (HuBERT at 100 s needs over 1 GB, too much beside a 7B LM on an 8 GB Jetson), so a
TensorRT engine or TensorRT-EP session takes up to 30 s, and anything longer (the reference
cuts audio into 100 s chunks, ``audio.MAX_CHUNK_SAMPLES``) runs on the next provider of the
chain: see ``providers.ProfiledSession`` and ``trt_engine.TensorRTSession``.
"""

from __future__ import annotations

# 30 s of 16 kHz audio.
GPU_MAX_SECONDS = 30
GPU_MAX_SAMPLES = GPU_MAX_SECONDS * 16_000
# The most likely length (a spoken turn of 10 s): TensorRT tunes its kernels for it.
GPU_OPT_SAMPLES = 160_000
# The vocoder synthesizes longer spans in exact windows of at most 30 s of 25 Hz frames, so
# a window always fits the generator's profile.
MAX_WINDOW_FRAMES = GPU_MAX_SECONDS * 25
