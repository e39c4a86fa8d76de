"""The front end's side of a new request: prompt to token ids, checked before the core sees it.

It reads what the front end needs without loading any weights (the HF config, the tokenizer,
the EOS ids, the context length), so a bad request is refused in the caller's process with a
``ValueError`` naming what to change, and the core only ever gets requests that fit. What needs
the tokenizer once per request is done here too (``bad_words`` into token ids), so the core
gets plain token ids.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from octavo.config import EngineConfig
from octavo.engine.core import check_request_fits
from octavo.model_loader import loader
from octavo.sampling_params import SamplingParams

PromptInput = Union[str, dict[str, Any]]


class InputProcessor:
    def __init__(self, config: EngineConfig, core_in_process: bool = False) -> None:
        self.config = config
        # Logits processors are callables: they reach only a core in this process.
        self.core_in_process = core_in_process
        self.model_path = loader.check_model_path(config.model, config.load_format)
        self.hf_config = loader.load_hf_config(self.model_path)
        self.max_model_len = loader.derive_max_model_len(self.hf_config, config.max_model_len)
        self.vocab_size: int = self.hf_config.vocab_size
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.tokenizer = None if config.skip_tokenizer_init else loader.load_tokenizer(self.model_path,
                                                                                        config.tokenizer)
        self.eos_token_ids = loader.eos_token_ids(self.model_path, self.hf_config, self.tokenizer)

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int], Optional[str]]:
        """(text, token ids, cache salt) from a string or a ``{"prompt"|"prompt_token_ids": ...}`` dict."""
        cache_salt = None
        if isinstance(prompt, dict):
            cache_salt = prompt.get("cache_salt")
            if cache_salt is not None and not isinstance(cache_salt, str):
                raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}.")
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
                # ``type(t) is int`` also refuses bools, and is fast over long prompts.
                if not isinstance(token_ids, (list, tuple)) or not all(type(t) is int for t in token_ids):
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), list(token_ids), cache_salt
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key.")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(
                f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}."
            )
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} instead of text.")
        return prompt, self.tokenizer.encode(prompt), cache_salt

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """Check the request for the core, and fill in what needs the tokenizer: ``bad_words``
        become ``params.bad_words_token_ids``."""
        if params.logits_processors and not self.core_in_process:
            raise ValueError(
                "logits_processors are Python callables and run only with the engine core in this process; "
                "start the engine with engine_core_process=False (LLM(..., engine_core_process=False)), or "
                "use logit_bias, allowed_token_ids, bad_words or structured_outputs, which work everywhere."
            )
        if self.tokenizer is None:
            unresolved_bad_words = params.bad_words and params.bad_words_token_ids is None
            for name, needed in (("structured_outputs", params.structured_outputs), ("bad_words", unresolved_bad_words)):
                if needed:
                    raise ValueError(f"{name} needs the model's tokenizer, and this engine has none "
                                     "(skip_tokenizer_init, or a model without tokenizer files).")
        params.resolve_bad_words(self.tokenizer)
        check_request_fits(token_ids, params, self.vocab_size, self.max_model_len, self.max_num_seqs)
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise ValueError(
                "stop strings need detokenized text: "
                + ("this model has no tokenizer" if self.tokenizer is None else "detokenize is False")
                + "; use stop_token_ids instead."
            )

