"""``LanguageModel``: the Spirit LM language model on llama.cpp (llama-cpp-python).

It runs our GGUF (see ``quant/gguf_convert.py``) with llama-cpp-python's low-level API:
one model, one context, one reusable batch and a llama.cpp sampler chain per call::

    lm = LanguageModel.from_bundle("bundle/")
    ids = lm.tokenizer.encode("[Text]The capital of France is")
    for token_id in lm.generate(ids, max_new_tokens=20, output_modality="text"):
        print(lm.tokenizer.decode([token_id]), end="")

* The modality constraint (spec section 2) is a logit-bias sampler (-inf on the banned
  ids) at the head of llama.cpp's sampler chain: no Python work per token.
* The KV cache is q8_0 with flash attention on a CPU by default (half the memory of f16, logits
  within 0.4% of f16's; f16 on a GPU); ``kv_cache="f16"`` keeps the exact cache.
* The KV cache is kept between calls: a new prompt that extends the previous one (a
  conversation) only prefills the new tokens; a prompt that diverges rewinds the cache
  to the common prefix.
* A GGUF is checked before llama.cpp sees it (:mod:`~spiritlm_edge.runtime.gguf_file`) so
  a truncated or foreign file is a clear error, never a crash inside llama.cpp.
* llama.cpp's "extra" CPU buffer types (weight repacking for AMX/AVX-512 kernels) are
  decided per machine (:mod:`~spiritlm_edge.runtime.cpu_buffers`): on only where a cached
  check found them safe and faster, off where unchecked; ``extra_cpu_buffers="on"/"off"``
  overrides that.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import llama_cpp
import numpy as np

from spiritlm_edge.runtime.bundle import Bundle
from spiritlm_edge.runtime.cpu_buffers import quant_type
from spiritlm_edge.runtime.cpu_buffers import resolve as resolve_cpu_buffers
from spiritlm_edge.runtime.errors import BundleError, ModelError
from spiritlm_edge.runtime.gguf_file import Keys, read_spiritlm_gguf, vocab_from_metadata
from spiritlm_edge.runtime.llama_log import install_llama_logging, log_listener
from spiritlm_edge.runtime.providers import llama_gpu_available, lm_gpu_memory_error, lm_gpu_settings
from spiritlm_edge.runtime.sampling import DEFAULT_SAMPLING, SamplingConfig
from spiritlm_edge.runtime.threads import default_threads
from spiritlm_edge.runtime.tokenizer import SpiritTokenizer
from spiritlm_edge.runtime.units import OutputModality, forbidden_token_ids

log = logging.getLogger(__name__)

CPU_KV_CACHE = "q8_0"  # the default KV cache type on a CPU (with flash attention)


class LanguageModel:
    """The Spirit LM LM on llama.cpp: prefill, constrained generation, KV-cache reuse."""

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        *,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_gpu_layers: int | None = None,
        extra_cpu_buffers: str | bool | None = "auto",
        flash_attn: bool | None = None,
        kv_cache: str | None = None,
    ):
        if kv_cache is None:
            # on a CPU, q8_0 + flash attention: half the f16 cache's memory for a small measured
            # cost (docs/benchmarks.md, "KV cache"); a GPU keeps f16
            on_cpu = (n_gpu_layers == 0 or not llama_gpu_available()) and flash_attn is not False
            kv_cache = CPU_KV_CACHE if on_cpu else "f16"
            flash_attn = True if on_cpu else flash_attn
        # n_gpu_layers None: every layer where llama.cpp has a GPU backend, else 0
        gpu = lm_gpu_settings(n_gpu_layers, kv_cache=kv_cache, flash_attn=flash_attn)
        self.kv_cache = kv_cache

        self._llama = llama_cpp
        self.info = read_spiritlm_gguf(gguf_path)
        self.path = self.info.path
        meta = self.info.metadata
        self.variant = str(meta[Keys.VARIANT])
        train_ctx = int(meta.get("llama.context_length", 4096))
        if n_ctx <= 0:
            n_ctx = train_ctx
        if n_ctx > train_ctx:
            raise ModelError(f"n_ctx={n_ctx} exceeds the model's trained context length {train_ctx}.")
        if n_batch <= 0:
            raise ModelError(f"n_batch must be positive, got {n_batch}.")
        install_llama_logging()
        llama_cpp.llama_backend_init()

        self.model_params = llama_cpp.llama_model_default_params()
        self.model_params.n_gpu_layers = gpu["n_gpu_layers"]
        # repacked (AMX) buffers crashed llama_decode on a 7B Q4_K_M: on only where checked safe
        self.cpu_buffers = resolve_cpu_buffers(extra_cpu_buffers, quant_type(meta))
        self.model_params.use_extra_bufts = self.cpu_buffers.enabled
        loading: list[str] = []  # llama.cpp only logs why a load failed: kept to explain it
        with log_listener(loading.append):
            model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), self.model_params)
        if not model:
            # on a GPU, most often memory: say so, and how much, rather than blame the file
            oom = lm_gpu_memory_error(loading, "loading the weights", gpu["n_gpu_layers"])
            if oom is not None:
                raise oom
            raise BundleError(
                f"llama.cpp could not load {self.path} (see the spiritlm_edge.llama_cpp log, -v). "
                "Rebuild the GGUF with `spiritlm-edge export lm`."
            )
        self._model = model
        self.n_threads = int(n_threads or default_threads())
        self.context_params = llama_cpp.llama_context_default_params()
        self.context_params.n_ctx = int(n_ctx)
        self.context_params.n_batch = int(n_batch)
        self.context_params.n_ubatch = int(n_batch)
        self.context_params.n_threads = self.n_threads
        self.context_params.n_threads_batch = int(n_threads_batch or self.n_threads)
        self.context_params.no_perf = True
        self.context_params.flash_attn_type = gpu["flash_attn_type"]
        self.context_params.type_k = gpu["type_k"]
        self.context_params.type_v = gpu["type_v"]
        creating: list[str] = []
        with log_listener(creating.append):
            ctx = llama_cpp.llama_init_from_model(model, self.context_params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            self._model = None
            oom = lm_gpu_memory_error(
                creating, f"creating its context (n_ctx={n_ctx}, {kv_cache} KV cache)", gpu["n_gpu_layers"]
            )
            if oom is not None:
                raise oom
            raise ModelError(
                f"llama.cpp could not create a context with n_ctx={n_ctx}, n_batch={n_batch} "
                "(out of memory?). Try a smaller n_ctx."
            )
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        # llama.cpp clamps the batch to the context: split prefills by what it really took, or
        # llama_decode aborts the process (GGML_ASSERT n_tokens_all <= n_batch)
        self.n_batch = int(llama_cpp.llama_n_batch(ctx))
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.vocab = vocab_from_metadata(meta, self.n_vocab)
        self.eos_id = int(meta.get("tokenizer.ggml.eos_token_id", 2))
        self.bos_id = int(meta.get("tokenizer.ggml.bos_token_id", 1))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._cached: list[int] = []  # tokens whose keys/values are in the cache, from position 0
        self._tokenizer = None
        self.stop_reason: str | None = None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, **kwargs) -> LanguageModel:
        return cls(path, **kwargs)

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> LanguageModel:
        """From a bundle directory (or :class:`Bundle`) holding an ``lm`` component."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle(bundle)
        return cls(bundle.path("lm"), **kwargs)

    @property
    def tokenizer(self):
        """The :class:`SpiritTokenizer` stored in the GGUF (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = SpiritTokenizer.from_metadata(self.info.metadata, source=str(self.path))
        return self._tokenizer

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        llama_cpp = self._llama
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- evaluation ----------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ModelError("The prompt is empty: pass at least the BOS token.")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ModelError(f"Token id {bad[0]} is outside the model's vocabulary (0..{self.n_vocab - 1}).")
        return ids

    def _decode(self, ids: Sequence[int], start: int, all_logits: bool = False) -> list[np.ndarray]:
        """Evaluate ``ids`` at positions ``start``..; with ``all_logits``, the logits after every
        one of them (else only the last one's are computed, read with :meth:`logits`)."""
        llama_cpp, batch = self._llama, self._batch
        rows: list[np.ndarray] = []
        for chunk_start in range(0, len(ids), self.n_batch):
            chunk = ids[chunk_start : chunk_start + self.n_batch]
            last_chunk = chunk_start + self.n_batch >= len(ids)
            batch.n_tokens = len(chunk)
            for j, token in enumerate(chunk):
                batch.token[j] = token
                batch.pos[j] = start + chunk_start + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = all_logits or (last_chunk and j == len(chunk) - 1)
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                # the cache may hold part of this batch: forget what we cannot vouch for
                self._rewind(start + chunk_start)
                raise ModelError(
                    f"llama_decode failed (status {status}) at position {start + chunk_start} of a "
                    f"{self.n_ctx}-token context" + (": the context is full." if status == 1 else ".")
                )
            self._cached.extend(chunk)
            if all_logits:
                for j in range(len(chunk)):
                    rows.append(self._logits_row(j))
        return rows

    def _logits_row(self, index: int) -> np.ndarray:
        ptr = self._llama.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _rewind(self, n_keep: int) -> None:
        self._llama.llama_memory_seq_rm(self._memory, 0, n_keep, -1)
        del self._cached[n_keep:]

    def reset(self) -> None:
        """Forget the conversation: the next prompt is prefilled from scratch."""
        self._llama.llama_memory_clear(self._memory, True)
        self._cached = []

    def prefill(self, ids: Sequence[int]) -> int:
        """Make the cache hold ``ids`` and the logits be those after the last one.

        Reuses the longest common prefix with what the cache holds; returns the number of
        tokens actually evaluated.
        """
        ids = self._check_ids(ids)
        if len(ids) >= self.n_ctx:
            raise ModelError(
                f"The prompt has {len(ids)} tokens but the context holds {self.n_ctx} (and one more "
                "is needed to generate). Shorten the prompt or raise n_ctx (up to the model's "
                f"{self.info.metadata.get('llama.context_length', '?')})."
            )
        common = min(self.cached_prefix(ids), len(ids) - 1)  # the last prompt token is always evaluated for its logits
        if common < len(self._cached):
            self._rewind(common)
        self._decode(ids[common:], common)
        return len(ids) - common

    def cached_prefix(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` the cache already holds (what :meth:`prefill`
        would not evaluate again)."""
        common = 0
        for a, b in zip(self._cached, ids, strict=False):
            if a != b:
                break
            common += 1
        return common

    def logits(self) -> np.ndarray:
        """Logits (float32, one per vocabulary row) after the last evaluated token."""
        return self._logits_row(-1)

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Logits after every token of ``ids`` (shape ``(len(ids), n_vocab)``), teacher-forced."""
        ids = self._check_ids(ids)
        if len(ids) > self.n_ctx:
            raise ModelError(f"{len(ids)} tokens do not fit the {self.n_ctx}-token context.")
        self.reset()
        return np.stack(self._decode(ids, 0, all_logits=True))

    # -- sampling ------------------------------------------------------------------

    def banned_ids(self, output_modality: OutputModality | str) -> list[int]:
        """Ids that may not be generated: spec section 2's set for the modality, plus the
        embedding's padding rows (they have no piece, so they could not be decoded)."""
        modality = OutputModality.parse(output_modality)
        banned = set(forbidden_token_ids(self.variant, modality, self.vocab))
        banned.update(range(self.vocab.n_real, self.n_vocab))
        return sorted(banned)

    def _bias_sampler(self, modality: OutputModality):
        llama_cpp = self._llama
        banned = self.banned_ids(modality)
        if not banned:
            return None
        biases = (llama_cpp.llama_logit_bias * len(banned))()
        for k, token in enumerate(banned):
            biases[k].token = token
            biases[k].bias = -math.inf
        return llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(banned), biases)

    def _sampler_chain(self, modality: OutputModality, sampling: SamplingConfig, history: Sequence[int] = ()):
        """llama.cpp's sampler chain for one generation; ``history`` (the prompt) is what the
        repetition penalty counts, as transformers counts every token of its input."""
        llama_cpp = self._llama
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(params)
        bias = self._bias_sampler(modality)
        if bias is not None:
            llama_cpp.llama_sampler_chain_add(chain, bias)
        if sampling.repetition_penalty != 1.0:
            # HF semantics: every token of the prompt and of the output counts
            llama_cpp.llama_sampler_chain_add(
                chain,
                llama_cpp.llama_sampler_init_penalties(self.n_vocab, self.n_ctx, sampling.repetition_penalty, 0.0, 0.0),
            )
            for token in history:
                llama_cpp.llama_sampler_accept(chain, token)
        if sampling.greedy:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        # HF order: temperature, then top-k, then top-p, then draw
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        if sampling.top_k > 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def next_token_distribution(
        self,
        logits: np.ndarray,
        sampling: SamplingConfig | None = None,
        *,
        output_modality: OutputModality | str = OutputModality.ARBITRARY,
        history: Sequence[int] = (),
    ) -> np.ndarray:
        """The probabilities :meth:`generate`'s sampler chain draws the next token from,
        given ``logits`` after a context ``history``: the chain is applied to the logits
        and llama.cpp's surviving candidates are read back (one-hot when greedy)."""
        llama_cpp, sampling = self._llama, sampling or DEFAULT_SAMPLING
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (self.n_vocab,):
            raise ModelError(f"logits must have shape ({self.n_vocab},), got {logits.shape}.")
        history = self._check_ids(history) if len(history) else []
        chain = self._sampler_chain(OutputModality.parse(output_modality), sampling, history)
        try:
            data = (llama_cpp.llama_token_data * self.n_vocab)()
            view = np.ctypeslib.as_array(data)
            view["id"], view["logit"], view["p"] = np.arange(self.n_vocab), logits, 0.0
            candidates = llama_cpp.llama_token_data_array(data, self.n_vocab, -1, False)
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
            # the chain may leave its candidates in a buffer of its own: read them where it says
            kept = np.ctypeslib.as_array(candidates.data, shape=(candidates.size,)).copy()
        finally:
            llama_cpp.llama_sampler_free(chain)
        probabilities = np.zeros(self.n_vocab, np.float64)
        if sampling.greedy:
            probabilities[kept["id"][candidates.selected]] = 1.0
        else:
            # the draw's weights (llama.cpp may leave them unnormalised)
            probabilities[kept["id"]] = kept["p"] / kept["p"].sum()
        return probabilities

    def generate(
        self,
        ids: Sequence[int],
        max_new_tokens: int | None = None,
        *,
        sampling: SamplingConfig | None = None,
        output_modality: OutputModality | str = OutputModality.ARBITRARY,
        stop_ids: Sequence[int] | None = None,
        **options: Any,
    ) -> Iterator[int]:
        """Yield generated token ids one by one after the prompt ``ids`` (BOS included).

        ``sampling`` (default ``SamplingConfig()``: greedy, as the reference) says how each
        token is chosen; ``max_new_tokens`` and ``options`` (its field names: do_sample,
        temperature, top_k, top_p, repetition_penalty, seed, max_length) change it.
        Stops at EOS (not yielded), ``stop_ids`` (yielded), the length limit or a full
        context; ``self.stop_reason`` then says which ("eos", "stop", "length", "context").
        Greedy is the exact argmax of the (constrained) logits. ``output_modality``
        TEXT/SPEECH bans the tokens of spec section 2 inside llama.cpp's sampler.
        """
        modality = OutputModality.parse(output_modality)
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        sampling = (sampling or DEFAULT_SAMPLING).updated(**options)
        ids = self._check_ids(ids)
        return self._generate(ids, sampling.new_token_limit(len(ids)), modality, sampling, set(stop_ids or ()))

    def _generate(self, ids, max_new_tokens, modality, sampling, stop_ids) -> Iterator[int]:
        llama_cpp = self._llama
        self.stop_reason = None
        self.prefill(ids)
        chain = self._sampler_chain(modality, sampling, ids)
        try:
            batch = self._batch
            for produced in range(max_new_tokens):
                token = llama_cpp.llama_sampler_sample(chain, self._ctx, -1)
                if token == self.eos_id:
                    self.stop_reason = "eos"
                    return
                yield token
                if token in stop_ids:
                    self.stop_reason = "stop"
                    return
                if produced == max_new_tokens - 1:
                    break
                position = len(self._cached)
                if position >= self.n_ctx:
                    self.stop_reason = "context"
                    log.warning("generation stopped: the %d-token context is full", self.n_ctx)
                    return
                # one-token decode, inlined: this loop is the hot path
                batch.n_tokens = 1
                batch.token[0] = token
                batch.pos[0] = position
                batch.n_seq_id[0] = 1
                batch.seq_id[0][0] = 0
                batch.logits[0] = 1
                status = llama_cpp.llama_decode(self._ctx, batch)
                if status != 0:
                    self._rewind(position)
                    raise ModelError(f"llama_decode failed (status {status}) at position {position}.")
                self._cached.append(token)
            self.stop_reason = "length"
        finally:
            llama_cpp.llama_sampler_free(chain)

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int | None = None, **kwargs: Any) -> list[int]:
        """All of :meth:`generate`'s tokens as a list."""
        return list(self.generate(ids, max_new_tokens, **kwargs))

    def __repr__(self) -> str:
        return f"LanguageModel({str(self.path)!r}, variant={self.variant!r}, n_ctx={self.n_ctx})"
