"""spiritlm-edge: Spirit LM on the edge.

The public API is re-exported lazily so that ``import spiritlm_edge`` stays cheap and
never pulls torch: the engines (ONNX Runtime, llama.cpp) load only when a class is used.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spiritlm-edge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_EXPORTS = {
    "SpiritLM": "spiritlm_edge.runtime.pipeline",
    "Spiritlm": "spiritlm_edge.runtime.pipeline",
    "Conversation": "spiritlm_edge.runtime.pipeline",
    "GenerationInput": "spiritlm_edge.runtime.pipeline",
    "GenerationOuput": "spiritlm_edge.runtime.pipeline",
    "GenerationOutput": "spiritlm_edge.runtime.pipeline",
    "ContentType": "spiritlm_edge.runtime.pipeline",
    "OutputModality": "spiritlm_edge.runtime.units",
    "SpeechTokenizer": "spiritlm_edge.runtime.speech",
    "LanguageModel": "spiritlm_edge.runtime.lm",
    "SamplingConfig": "spiritlm_edge.runtime.sampling",
    "SpiritLMEdgeError": "spiritlm_edge.runtime.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spiritlm_edge' has no attribute {name!r}")
    return getattr(import_module(module), name)
