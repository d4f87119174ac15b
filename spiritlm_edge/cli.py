"""The ``spiritlm-edge`` command line.

Each command is a thin wrapper: it parses options, sets up logging and calls one
function of the library, turning :class:`SpiritLMEdgeError` into a one-line message and
exit code 2 instead of a traceback. Commands that need torch (the exporters) import it
only when they run, so the edge install can still show ``--help``.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path

import typer

from spiritlm_edge.runtime.errors import SpiritLMEdgeError
from spiritlm_edge.runtime.sampling import CLI_SAMPLING, SamplingConfig

app = typer.Typer(
    name="spiritlm-edge",
    help="Spirit LM on the edge: export the released checkpoints to ONNX + GGUF engines and run "
    "speech-to-speech with them on a CPU, a desktop GPU or a Jetson.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Export one part of the model into a bundle.", no_args_is_help=True)
app.add_typer(export_app, name="export", help="Export the speech engines or the LM into a bundle.")

log = logging.getLogger("spiritlm_edge")

CheckpointsOption = typer.Option(
    None,
    "--checkpoints",
    envvar="SPIRITLM_CHECKPOINTS_DIR",
    help="Checkpoint root (holds speech_tokenizer/ and spiritlm_model/); default $SPIRITLM_CHECKPOINTS_DIR.",
)
VariantOption = typer.Option("base", "--variant", help="base or expressive.")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def version_callback(value: bool) -> None:
    if value:
        from spiritlm_edge import __version__

        typer.echo(f"spiritlm-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    setup_logging(verbose)


@app.command("make-tiny-checkpoints")
def make_tiny_checkpoints_cmd(
    out: Path = typer.Argument(..., help="Directory to write the checkpoint root into."),
    variant: str = VariantOption,
    seed: int = typer.Option(0, help="Random seed: the same seed writes the same weights."),
) -> None:
    """Write a tiny random-weight checkpoint root in the release's exact formats."""
    from spiritlm_edge.export.tiny import make_tiny_checkpoints

    root = make_tiny_checkpoints(out, variant=variant, seed=seed)
    typer.echo(f"wrote tiny {variant} checkpoints (random weights) to {root}")


def _check_engine(engine: str) -> None:
    """Before minutes of export: is the engine known, and can it be built here?"""
    import importlib.util

    if engine not in ("onnx", "tensorrt"):
        fail(f"--engine {engine!r}: expected onnx or tensorrt.")
    if engine == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        fail(
            "--engine tensorrt needs the tensorrt module: pip install 'spiritlm-edge[gpu]' on a desktop, "
            "or `sudo apt install python3-libnvinfer` (JetPack) on a Jetson; or build with --engine onnx."
        )


def _vocoder_layout(engine: str) -> str:
    # The blocked 2-D vocoder graph is tuned for ONNX Runtime's x86 CPU kernels; TensorRT
    # gets the plain 1-D graph.
    return "plain" if engine == "tensorrt" else "blocked"


def _maybe_tensorrt(engine: str, bundle: Path) -> None:
    """TensorRT engines are built from the bundle's ONNX models, for this machine's GPU."""
    if engine == "tensorrt":
        from spiritlm_edge.export.tensorrt import build_tensorrt_engines

        records = build_tensorrt_engines(bundle, precision="fp16")
        typer.echo(f"built TensorRT engines: {', '.join(sorted(records))}")


@export_app.command("speech")
def export_speech_cmd(
    out: Path = typer.Option(..., "--out", help="Bundle directory to write (created if needed)."),
    checkpoints: Path | None = CheckpointsOption,
    variant: str = VariantOption,
    fcpe_weights: Path | None = typer.Option(
        None,
        "--fcpe-weights",
        envvar="SPIRITLM_FCPE_WEIGHTS",
        help="FCPE weights (fcpe_c_v001.pt); default: the copy inside the torchfcpe package.",
    ),
    opset: int = typer.Option(17, help="ONNX opset."),
    engine: str = typer.Option("onnx", "--engine", help="onnx, or tensorrt to also build TensorRT engines (GPU)."),
) -> None:
    """Export HuBERT, pitch, style and vocoder to ONNX in a bundle."""
    from spiritlm_edge.export.speech import export_speech

    _check_engine(engine)
    manifest = export_speech(
        checkpoints, variant, out, fcpe_weights=fcpe_weights, opset=opset, vocoder_layout=_vocoder_layout(engine)
    )
    _maybe_tensorrt(engine, out)
    typer.echo(f"wrote {', '.join(sorted(manifest['components']))} to {out}")


@export_app.command("lm")
def export_lm_cmd(
    checkpoints: Path | None = CheckpointsOption,
    variant: str = VariantOption,
    out: Path = typer.Option(..., "--out", help="Bundle directory to write lm-<quant>.gguf into."),
    quant: str = typer.Option("Q4_K_M", "--quant", help="F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M or Q4_0."),
    threads: int | None = typer.Option(None, "--threads", help="Quantizer threads (default: physical cores)."),
) -> None:
    """Convert the language model to GGUF (streamed) and quantize it with llama.cpp."""
    from spiritlm_edge.export.build import export_lm
    from spiritlm_edge.export.checkpoints import CheckpointPaths, resolve_checkpoint_root
    from spiritlm_edge.quant.llama_quantize import check_quant

    check_quant(quant)  # before any work
    root = resolve_checkpoint_root(checkpoints)
    path = export_lm(CheckpointPaths(root), variant, out, quant=quant, n_threads=threads)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("build")
def build_cmd(
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
    checkpoints: Path | None = CheckpointsOption,
    variant: str = VariantOption,
    quant: str = typer.Option("Q4_K_M", "--quant", help="LM quantization: F16, Q8_0, Q5_K_M, Q4_K_M, Q4_0, ..."),
    fcpe_weights: Path | None = typer.Option(None, "--fcpe-weights", envvar="SPIRITLM_FCPE_WEIGHTS"),
    threads: int | None = typer.Option(None, "--threads", help="Quantizer threads."),
    engine: str = typer.Option("onnx", "--engine", help="onnx, or tensorrt to also build TensorRT engines (GPU)."),
    int8: bool = typer.Option(False, "--int8", help="Also write int8 speech engines that pass the accuracy gate."),
) -> None:
    """Build a complete bundle (speech ONNX + LM GGUF + VAD) from a checkpoint root."""
    from spiritlm_edge.export.build import build_bundle

    _check_engine(engine)
    manifest = build_bundle(
        checkpoints,
        variant,
        out,
        quant=quant,
        fcpe_weights=fcpe_weights,
        n_threads=threads,
        vocoder_layout=_vocoder_layout(engine),
    )
    if int8:
        from spiritlm_edge.quant.onnx_int8 import quantize_bundle

        quantize_bundle(out, int8=True, n_threads=threads)
    _maybe_tensorrt(engine, out)
    typer.echo(f"wrote the {manifest['variant']} bundle to {out}: {', '.join(sorted(manifest['components']))}")


@app.command("info")
def info_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    verify: bool = typer.Option(False, "--verify", help="Hash every file, the LM included."),
    check_cpu_buffers: bool = typer.Option(
        False,
        "--check-cpu-buffers",
        help="Decide (and cache) whether llama.cpp's extra CPU buffers are safe and faster here: loads the LM twice.",
    ),
) -> None:
    """Show what a bundle holds, which accelerators this machine offers and the LM's CPU buffer decision."""
    import onnxruntime

    from spiritlm_edge.runtime.bundle import Bundle

    opened = Bundle(bundle)
    if verify:
        opened.verify_all()
    manifest = opened.manifest
    typer.echo(f"bundle:  {opened.dir}")
    typer.echo(f"variant: {opened.variant}   made by: {manifest.get('created_by', '?')}")
    rates = manifest.get("token_rates", {})
    if rates:
        typer.echo("token rates: " + ", ".join(f"{k} {v} Hz" for k, v in rates.items()))
    typer.echo("components:")
    for name, entry in sorted(opened.components.items()):
        extra = f"  quant {entry['quant']}" if "quant" in entry else ""
        typer.echo(f"  {name:<18} {entry['file']:<28} {entry['bytes'] / 1e6:10.1f} MB{extra}")
    total = sum(e["bytes"] for e in opened.components.values())
    typer.echo(f"  {'total':<18} {'':<28} {total / 1e6:10.1f} MB")
    if verify:
        typer.echo("all files match their sha256")
    typer.echo("ONNX Runtime providers here: " + ", ".join(onnxruntime.get_available_providers()))
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
        typer.echo(f"llama.cpp GPU offload: {'yes' if offload else 'no (CPU build)'}")
    except ImportError:
        typer.echo("llama.cpp: llama-cpp-python is not installed")
        return
    if "lm" in opened.components:
        _show_cpu_buffers(opened.path("lm"), check_cpu_buffers)


def _show_cpu_buffers(gguf: Path, check: bool) -> None:
    from spiritlm_edge.runtime import cpu_buffers
    from spiritlm_edge.runtime.gguf_file import read_gguf

    quant = cpu_buffers.quant_type(read_gguf(gguf).metadata)
    if check:
        typer.echo(f"checking llama.cpp's extra CPU buffers ({quant}, each setting in a child process) ...")
        entry = cpu_buffers.check(gguf, quant)
        for name in ("off", "on"):
            run = entry[name]
            if run["survived"]:
                prefill, decode = run["prefill_tokens_per_s"], run["decode_tokens_per_s"]
                figures = f"prefill {prefill:8.1f} tok/s   decode {decode:6.2f} tok/s"
                if run.get("peak_rss_bytes"):
                    figures += f"   peak memory {run['peak_rss_bytes'] / 1e9:5.2f} GB"
            else:
                figures = f"CRASHED  {run['error']}"
            typer.echo(f"  extra buffers {name:<3}  {figures}")
        typer.echo(f"  cached in {cpu_buffers.cache_path()}")
    typer.echo(f"llama.cpp extra CPU buffers: {cpu_buffers.resolve('auto', quant)}")


@app.command("quantize")
def quantize_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory (its fp32 engines stay; variants are added)."),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="Write int8 variants (CPU)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write fp16 variants (GPU execution providers)."),
    calibration: list[Path] | None = typer.Option(
        None, "--calibration", help="Speech files to calibrate and gate on (repeatable; default: bundled clip)."
    ),
    components: str = typer.Option("hubert,style,vocoder", "--components", help="Comma-separated engines."),
    force: bool = typer.Option(False, "--force", help="Write variants that fail the accuracy gate."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for calibration and the gate."),
) -> None:
    """Add gated int8 / fp16 variants of the speech engines; the runtime then prefers int8
    (SPIRITLM_EDGE_PRECISION=fp32|int8|fp16 overrides)."""
    from spiritlm_edge.quant.onnx_int8 import QUANTIZABLE, GateRefused, quantize_bundle

    names = tuple(c.strip() for c in components.split(",") if c.strip())
    if names == QUANTIZABLE:
        names = QUANTIZABLE  # the default: only the ones the bundle has
    try:
        report = quantize_bundle(
            bundle, int8=int8, fp16=fp16, calibration=calibration, force=force, components=names, n_threads=threads
        )
        refused = None
    except GateRefused as exc:
        report, refused = exc.report, exc
    for name, results in report.items():
        for precision, result in results.items():
            for item in result if isinstance(result, list) else [result]:
                verdict = "written" if item["written"] else "refused"
                figures = ", ".join(f"{k} {v}" for k, v in item["figures"].items())
                typer.echo(
                    f"{name:<8} {precision.replace('_tried', ''):<5} {item['recipe']:<17} {verdict:<8} {figures}"
                )
    if refused is not None:
        fail(str(refused))


ProvidersOption = typer.Option(
    None, "--providers", help="ONNX Runtime execution providers, comma-separated (default: CPU)."
)
ThreadsOption = typer.Option(None, "--threads", help="CPU threads for every engine (default: cores).")
GpuLayersOption = typer.Option(None, "--n-gpu-layers", help="LM layers on the GPU (default: all if CUDA, else 0).")
CpuBuffersOption = typer.Option(
    "auto",
    "--cpu-buffers",
    help="llama.cpp's extra CPU buffers: auto (this machine's cached check, else off), on or off.",
)

SpeechEncodingOption = typer.Option(
    None,
    "--speech-encoding",
    help="whole: encode each user turn once it is over (the reference's units); streaming: encode and "
    "prefill it while it is spoken (sliding window, much sooner answers). Default: streaming live, whole for files.",
)
StreamWindowOption = typer.Option(
    None,
    "--stream-window",
    help="The streaming encoder's window, LEFT:STEP:LOOKAHEAD in seconds (default 1.5:1.0:0.5); "
    "`spiritlm-edge agreement` measures the choice.",
)


def _speech_encoding(value: str | None, default: str) -> str:
    from spiritlm_edge.runtime.pipeline import SPEECH_ENCODINGS

    if value is None:
        return default
    if value not in SPEECH_ENCODINGS:
        fail(f"--speech-encoding takes {' or '.join(SPEECH_ENCODINGS)}, not {value!r}.")
    return value


def _stream_window(value: str | None):
    """``LEFT:STEP:LOOKAHEAD`` seconds -> a StreamingWindow (None: the default one)."""
    from spiritlm_edge.runtime.speech import StreamingWindow

    if value is None:
        return None
    try:
        left, step, lookahead = (float(part) for part in value.split(":"))
    except ValueError:
        fail(f"--stream-window takes LEFT:STEP:LOOKAHEAD in seconds (e.g. 1.5:1.0:0.5), not {value!r}.")
    return StreamingWindow(left, step, lookahead)


def _providers(value: str | None):
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


def _open_spirit_lm(
    bundle: Path,
    providers: str | None,
    threads: int | None,
    n_gpu_layers: int | None,
    cpu_buffers: str = "auto",
    **lm_options,
):
    from spiritlm_edge.runtime.pipeline import SpiritLM

    return SpiritLM(
        bundle,
        providers=_providers(providers),
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        extra_cpu_buffers=cpu_buffers,
        **lm_options,
    )


def _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, greedy, seed) -> SamplingConfig:
    return CLI_SAMPLING.updated(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )


@app.command("run")
def run_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory."),
    mic: bool = typer.Option(False, "--mic", help="Live: talk through the microphone and speaker."),
    input: Path | None = typer.Option(None, "--input", help="Audio file with the user's turn."),
    text: str | None = typer.Option(None, "--text", help="Text for the user's turn (after --input if both)."),
    output: Path | None = typer.Option(None, "--output", help="WAV file for the spoken answer."),
    mode: str = typer.Option("speech", "--mode", help="Answer modality: speech, text or arbitrary."),
    speaker: int = typer.Option(2, "--speaker", help="Vocoder speaker id."),
    # the CLI samples by default (runtime/sampling.py's CLI_SAMPLING); the Python API is greedy
    max_new_tokens: int = typer.Option(CLI_SAMPLING.max_new_tokens, "--max-new-tokens"),
    temperature: float = typer.Option(CLI_SAMPLING.temperature, "--temperature", help="0: greedy."),
    top_p: float = typer.Option(CLI_SAMPLING.top_p, "--top-p", help="1.0: off."),
    top_k: int = typer.Option(CLI_SAMPLING.top_k, "--top-k", help="0: off."),
    repetition_penalty: float = typer.Option(CLI_SAMPLING.repetition_penalty, "--repetition-penalty"),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding instead of sampling."),
    seed: int | None = typer.Option(None, "--seed", help="Make sampling reproducible."),
    input_device: str | None = typer.Option(None, "--input-device", help="Microphone: index or name."),
    output_device: str | None = typer.Option(None, "--output-device", help="Speaker: index or name."),
    list_devices: bool = typer.Option(False, "--list-devices", help="List audio devices and exit."),
    max_seconds: float | None = typer.Option(None, "--max-seconds", help="End the live session after N s."),
    vad_model: Path | None = typer.Option(None, "--vad-model", help="silero_vad.onnx (default: the bundle's)."),
    end_silence_ms: float = typer.Option(700.0, "--end-silence-ms", help="Silence that ends the user's turn."),
    aec: str | None = typer.Option(
        None, "--aec", help="on|off: cancel the speaker's echo before the VAD (default: on with barge-in)."
    ),
    no_barge_in: bool = typer.Option(
        False, "--no-barge-in", help="Don't stop the answer when the user speaks (where --aec cannot run)."
    ),
    barge_in_min_ms: float = typer.Option(
        300.0, "--barge-in-min-ms", help="Speech that cuts the answer; shorter speech (an 'mm-hmm') does not."
    ),
    speech_encoding: str | None = SpeechEncodingOption,
    stream_window: str | None = StreamWindowOption,
    providers: str | None = ProvidersOption,
    threads: int | None = ThreadsOption,
    n_gpu_layers: int | None = GpuLayersOption,
    cpu_buffers: str = CpuBuffersOption,
    n_ctx: int = typer.Option(2048, "--n-ctx", help="LM context length (the conversation's memory)."),
    kv_cache: str | None = typer.Option(
        None, "--kv-cache", help="KV-cache type: f16 or q8_0 (half the memory). Default: q8_0 on a CPU, f16 on a GPU."
    ),
    flash_attn: bool | None = typer.Option(
        None, "--flash-attn/--no-flash-attn", help="Default: on with a q8_0 cache, else llama.cpp decides."
    ),
) -> None:
    """Speech-to-speech: one turn from files, or a live microphone loop (--mic)."""
    from spiritlm_edge.runtime.audio import write_wav
    from spiritlm_edge.runtime.events import TextDelta, TurnEnd
    from spiritlm_edge.runtime.pipeline import Conversation

    if list_devices:
        from spiritlm_edge.runtime.audio_io import format_devices
        from spiritlm_edge.runtime.audio_io import list_devices as list_audio_devices

        typer.echo(format_devices(list_audio_devices()))
        return
    if not mic and input is None and text is None:
        fail("give --mic for a live session, or --input FILE and/or --text TEXT for one turn from files.")
    if aec not in (None, "on", "off"):
        fail(f"--aec takes on or off, not {aec!r}.")
    echo_cancellation = not no_barge_in if aec is None else aec == "on"
    if mic and echo_cancellation:
        from spiritlm_edge.runtime.aec import check_available

        check_available()  # before loading the model: a missing library is said at once
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, greedy, seed)  # fail fast
    # live turns are encoded while spoken; a file is encoded whole, as the reference does
    encoding = _speech_encoding(speech_encoding, default="streaming" if mic else "whole")
    window = _stream_window(stream_window)
    spirit_lm = _open_spirit_lm(
        bundle, providers, threads, n_gpu_layers, cpu_buffers, n_ctx=n_ctx, kv_cache=kv_cache, flash_attn=flash_attn
    )
    conversation = Conversation(spirit_lm, output_modality=mode, speaker_id=speaker, sampling=sampling)
    if mic:
        from spiritlm_edge.runtime.live import run_mic_session

        summary = run_mic_session(
            conversation.respond,
            aec=echo_cancellation,
            input_device=_device(input_device),
            output_device=_device(output_device),
            max_seconds=max_seconds,
            vad_model=vad_model,
            bundle=spirit_lm.bundle,
            barge_in=not no_barge_in,
            end_silence_ms=end_silence_ms,
            barge_in_min_ms=barge_in_min_ms,
            listen=partial(conversation.listen, window) if encoding == "streaming" else None,
        )
        typer.echo(f"session ended: {summary}", err=True)
        return
    inputs = ([("SPEECH", str(input))] if input else []) + ([("TEXT", text)] if text else [])
    end: TurnEnd | None = None
    for event in conversation.stream(inputs, speech_encoding=encoding):
        if isinstance(event, TextDelta):
            typer.echo(event.text, nl=False)
        elif isinstance(event, TurnEnd):
            end = event
    typer.echo("")
    assert end is not None, "a turn's stream always ends with its TurnEnd"
    if end.audio is not None and output is not None:
        write_wav(output, end.audio)
        typer.echo(f"wrote {output} ({end.audio.size / 16000:.2f} s)", err=True)
    elif end.audio is not None:
        typer.echo("the answer has speech: give --output FILE.wav to keep it", err=True)


def _device(value: str | None):
    return int(value) if value is not None and value.isdigit() else value


@app.command("serve")
def serve_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(8765, "--port"),
    token: str | None = typer.Option(
        None, "--token", envvar="SPIRITLM_TOKEN", help="Clients must send 'Authorization: Bearer TOKEN'."
    ),
    allow_origin: list[str] | None = typer.Option(
        None, "--allow-origin", help="Another browser Origin allowed to connect (repeatable)."
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS and WSS."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    max_connections: int = typer.Option(8, "--max-connections"),
    max_queued_turns: int = typer.Option(4, "--max-queued-turns", help="Turns waiting for the model before 'busy'."),
    idle_timeout_s: float = typer.Option(300.0, "--idle-timeout", help="Close a connection silent this long (s)."),
    providers: str | None = ProvidersOption,
    threads: int | None = ThreadsOption,
    n_gpu_layers: int | None = GpuLayersOption,
    n_ctx: int = typer.Option(2048, "--n-ctx", help="LM context length (a connection's memory)."),
    cpu_buffers: str = CpuBuffersOption,
    speech_encoding: str | None = SpeechEncodingOption,
    stream_window: str | None = StreamWindowOption,
) -> None:
    """Serve the OpenAI Realtime protocol (WebSocket /v1/realtime) and the kiosk page (/)."""
    from spiritlm_edge.server.app import ServerConfig, serve
    from spiritlm_edge.server.realtime import Limits

    encoding = _speech_encoding(speech_encoding, default="streaming")  # server VAD turns are live turns
    window = _stream_window(stream_window)
    limits = Limits(max_connections=max_connections, max_queued_turns=max_queued_turns, idle_timeout_s=idle_timeout_s)
    config = ServerConfig(
        host=host,
        port=port,
        token=token,
        allow_origins=list(allow_origin or []),
        tls_cert=tls_cert,
        tls_key=tls_key,
        limits=limits,
    )
    serve(
        bundle,
        config,
        providers=_providers(providers),
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        n_ctx=n_ctx,
        extra_cpu_buffers=cpu_buffers,
        speech_encoding=encoding,
        window=window,
    )


@app.command("agreement")
def agreement_cmd(
    files: list[Path] = typer.Argument(..., help="Speech recordings (any rate; one turn each)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory."),
    stream_window: str | None = StreamWindowOption,
    threads: int | None = ThreadsOption,
    json_path: Path | None = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """How often streamed units (encoded while spoken) agree with whole-turn units."""
    import json
    from dataclasses import asdict

    from spiritlm_edge.bench.agreement import format_report, measure
    from spiritlm_edge.bench.synthetic import synthetic_info
    from spiritlm_edge.runtime.speech import StreamingWindow

    window = _stream_window(stream_window) or StreamingWindow()
    results, total = measure(bundle, files, window, threads)
    typer.echo(format_report(results, total, window, synthetic=synthetic_info(bundle) is not None))
    if json_path is not None:
        report = {"window": asdict(window), "files": [asdict(r) for r in results], "total": asdict(total)}
        json_path.write_text(json.dumps(report, indent=2) + "\n")


@app.command("asr")
def asr_cmd(
    audio: Path = typer.Argument(..., help="Speech to transcribe."),
    bundle: Path = typer.Option(..., "--bundle"),
    examples: Path | None = typer.Option(
        None, "--examples", help="TSV of few-shot examples: audio<TAB>transcript (default: zero-shot)."
    ),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens"),
    providers: str | None = ProvidersOption,
    threads: int | None = ThreadsOption,
    n_gpu_layers: int | None = GpuLayersOption,
    cpu_buffers: str = CpuBuffersOption,
) -> None:
    """Few-shot speech recognition: [Speech]units[Text]transcript prompts."""
    from spiritlm_edge.runtime.tasks import asr_prompt, read_examples

    spirit_lm = _open_spirit_lm(bundle, providers, threads, n_gpu_layers, cpu_buffers)
    pairs = read_examples(examples) if examples else []
    prompt = asr_prompt(spirit_lm.speech_tokenizer, audio, pairs)
    outputs = spirit_lm.generate(prompt=prompt, output_modality="TEXT", max_new_tokens=max_new_tokens)
    # the answer ends where the model starts the next example
    typer.echo(outputs[0].content.split("\n")[0].strip())


@app.command("tts")
def tts_cmd(
    text: str = typer.Argument(..., help="Text to speak."),
    output: Path = typer.Option(..., "--output", "-o", help="WAV file to write."),
    bundle: Path = typer.Option(..., "--bundle"),
    examples: Path | None = typer.Option(
        None, "--examples", help="TSV of few-shot examples: audio<TAB>text (default: zero-shot)."
    ),
    speaker: int = typer.Option(2, "--speaker"),
    max_new_tokens: int = typer.Option(300, "--max-new-tokens"),
    seed: int | None = typer.Option(None, "--seed"),
    providers: str | None = ProvidersOption,
    threads: int | None = ThreadsOption,
    n_gpu_layers: int | None = GpuLayersOption,
    cpu_buffers: str = CpuBuffersOption,
) -> None:
    """Few-shot text-to-speech: [Text]text[Speech]units prompts."""
    from spiritlm_edge.runtime.audio import write_wav
    from spiritlm_edge.runtime.tasks import read_examples, tts_prompt

    spirit_lm = _open_spirit_lm(bundle, providers, threads, n_gpu_layers, cpu_buffers)
    pairs = read_examples(examples) if examples else []
    prompt = tts_prompt(spirit_lm.speech_tokenizer, text, pairs)
    outputs = spirit_lm.generate(
        prompt=prompt,
        output_modality="SPEECH",
        speaker_id=speaker,
        max_new_tokens=max_new_tokens,
        do_sample=seed is not None,
        seed=seed,
    )
    write_wav(output, outputs[0].content)
    typer.echo(f"wrote {output} ({outputs[0].content.size / 16000:.2f} s)")


@app.command("devices")
def devices_cmd() -> None:
    """List the audio devices (for run --mic --input-device / --output-device)."""
    from spiritlm_edge.runtime.audio_io import format_devices, list_devices

    typer.echo(format_devices(list_devices()))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("spiritlm-demo-answer.wav"), "--out", help="Where to write the answer."),
    variant: str = VariantOption,
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild the cached tiny bundle."),
    threads: int | None = ThreadsOption,
) -> None:
    """Speech-to-speech on a LibriSpeech clip with a tiny random-weight bundle (built once)."""
    from spiritlm_edge.demo import run_demo

    run_demo(out, variant=variant, rebuild=rebuild, n_threads=threads, echo=typer.echo)


@app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench_cmd(ctx: typer.Context) -> None:
    """Latency benchmark of a bundle (per stage, per turn, memory, vs llama.cpp and PyTorch):
    `spiritlm-edge bench --help` lists its options."""
    # One parser for both entry points: bench/latency.py owns the options.
    from spiritlm_edge.bench.latency import main as bench_main

    bench_main(list(ctx.args))


@export_app.command("tensorrt")
def export_tensorrt_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory whose ONNX models to compile."),
    fp32: bool = typer.Option(False, "--fp32", help="Build fp32 engines (default fp16)."),
    components: str | None = typer.Option(
        None, "--components", help="Comma-separated components (default: every ONNX model of the bundle)."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that are up to date too."),
    workspace_mb: int | None = typer.Option(None, "--workspace-mb", help="TensorRT builder workspace limit."),
    device: int = typer.Option(0, "--device", help="CUDA device index."),
) -> None:
    """Compile the bundle's ONNX models into TensorRT engines for this GPU (run it on the device)."""
    from spiritlm_edge.export.tensorrt import build_tensorrt_engines

    names = [c.strip() for c in components.split(",") if c.strip()] if components else None
    records = build_tensorrt_engines(
        bundle,
        precision="fp32" if fp32 else "fp16",
        components=names,
        force=force,
        workspace_bytes=workspace_mb * 2**20 if workspace_mb else None,
        device_id=device,
    )
    for name, record in records.items():
        typer.echo(f"{name}: {record['file']} ({record['precision']}, {record['gpu']}, TensorRT {record['tensorrt']})")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SpiritLMEdgeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except ImportError as exc:
        if exc.name in ("torch", "onnx", "transformers", "gguf", "yaml", "onnxscript"):
            typer.secho(
                f"error: this command needs the export extra ({exc.name} is missing): "
                "pip install 'spiritlm-edge[export]'",
                fg=typer.colors.RED,
                err=True,
            )
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
