"""Quantize a Spirit LM GGUF with llama.cpp's own quantizer (through llama-cpp-python).

``llama_model_quantize`` is one blocking C call. Progress is real, not guessed: the
quantizer logs one line per tensor, which a log listener counts against the tensor count
read from the source file's header. All metadata, our ``spiritlm.*`` keys included, is
copied by llama.cpp into the output.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from pathlib import Path

import llama_cpp
from tqdm import tqdm

from spiritlm_edge.runtime.errors import ModelError
from spiritlm_edge.runtime.gguf_file import read_spiritlm_gguf
from spiritlm_edge.runtime.llama_log import log_listener
from spiritlm_edge.runtime.threads import default_threads

log = logging.getLogger(__name__)

# quant name -> llama_ftype (llama.h)
QUANT_TYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2}
# written directly by the converter, no quantizer involved
CONVERTER_TYPES = ("F32", "F16", "BF16")
SUPPORTED = CONVERTER_TYPES + tuple(QUANT_TYPES)
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def check_quant(quant: str) -> str:
    """The canonical name of ``quant``, or a :class:`ModelError` listing the supported ones."""
    name = quant.strip().upper()
    if name not in SUPPORTED:
        raise ModelError(f"Unsupported quantization {quant!r}: choose one of {', '.join(SUPPORTED)}.")
    return name


def quantize_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    quant: str,
    n_threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``src`` (an F32/F16/BF16 GGUF) quantized to ``quant`` at ``dst``.

    Written under a temporary name and renamed when complete; the result is checked to
    be a readable Spirit LM GGUF.
    """
    quant = check_quant(quant)
    if quant not in QUANT_TYPES:
        raise ModelError(f"{quant} is written by the converter, not by the quantizer.")
    src, dst = Path(src), Path(dst)
    n_tensors = len(read_spiritlm_gguf(src).tensors)
    tmp = dst.with_name(dst.name + ".part")

    bar = None
    if progress:
        bar = tqdm(total=n_tensors, desc=f"quantizing to {quant}", unit="tensor", leave=False)
    seen = [0]

    def on_log(message: str) -> None:
        m = _TENSOR_LINE.search(message)
        if m and int(m.group(2)) == n_tensors:
            done = int(m.group(1))
            if bar is not None and done > seen[0]:
                bar.update(done - seen[0])
            seen[0] = max(seen[0], done)

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = int(n_threads or default_threads())
    start = time.perf_counter()
    try:
        with log_listener(on_log):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        if bar is not None:
            bar.close()
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise ModelError(
            f"llama.cpp failed to quantize {src} to {quant} (status {status}); run with -v to see its log."
        )
    os.replace(tmp, dst)
    read_spiritlm_gguf(dst)  # metadata copied, file complete
    log.info(
        "quantized %s -> %s (%s, %.1f MB) in %.1f s",
        src.name,
        dst.name,
        quant,
        dst.stat().st_size / 1e6,
        time.perf_counter() - start,
    )
    return dst
