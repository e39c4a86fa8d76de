"""The offline API in vLLM's shapes: prompts, params, logprobs, stops, chat, errors."""

from __future__ import annotations

import pytest
import torch

from octavo import LLM, CompletionOutput, Logprob, RequestOutput, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    folder, _ = tiny_model_factory("llama", with_tokenizer=True)
    return LLM(str(folder), device="cpu", dtype="float32", max_model_len=128, block_size=4)


@pytest.fixture(scope="module")
def bare_llm(tiny_model_factory):
    folder, _ = tiny_model_factory("qwen3")
    return LLM(str(folder), device="cpu", max_model_len=64)


def test_generate_accepts_strings_and_dicts_and_keeps_order(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["Hello, my name is", {"prompt": "The capital of France is"},
               {"prompt_token_ids": llm.get_tokenizer().encode("Hello, my name is")}]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [type(o) for o in outputs] == [RequestOutput] * 3
    assert outputs[0].prompt == "Hello, my name is"
    assert outputs[0].prompt_token_ids == outputs[2].prompt_token_ids
    assert outputs[0].outputs[0].token_ids == outputs[2].outputs[0].token_ids
    completion = outputs[1].outputs[0]
    assert isinstance(completion, CompletionOutput) and completion.finish_reason == "length"
    assert len(completion.token_ids) == 6
    # Random weights emit arbitrary bytes; an incomplete trailing character is held back, not shown as U+FFFD.
    decoded = llm.get_tokenizer().decode(completion.token_ids, skip_special_tokens=True)
    assert completion.text == decoded.rstrip("\ufffd")
    assert outputs[1].finished


def test_one_params_per_prompt(llm):
    outputs = llm.generate(["a", "b"], [SamplingParams(max_tokens=2, ignore_eos=True),
                                        SamplingParams(max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [2, 5]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_seeded_sampling_is_reproducible_regardless_of_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=1, ignore_eos=True)
    alone = llm.generate(["Hello"], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batched = llm.generate(["x y z", "Hello", "The capital"], [others, params, others], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone


def test_logprobs_in_vllm_shape(llm):
    params = SamplingParams(temperature=0.8, max_tokens=5, logprobs=3, prompt_logprobs=2, seed=3, ignore_eos=True)
    output = llm.generate(["Hello, my name is"], params, use_tqdm=False)[0]
    completion = output.outputs[0]
    assert len(completion.logprobs) == 5
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert all(isinstance(lp, Logprob) and lp.logprob <= 0 and lp.rank >= 1 for lp in entry.values())
        assert sorted(lp.rank for lp in entry.values())[:3] == [1, 2, 3]
        assert isinstance(entry[token].decoded_token, str)
    assert completion.cumulative_logprob == pytest.approx(
        sum(entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)), abs=1e-4)
    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(output.prompt_token_ids)
    for token, entry in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
        assert token in entry


def test_stop_strings_and_stop_tokens(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = llm.generate(["Hello"], greedy, use_tqdm=False)[0].outputs[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    stop_token = full.token_ids[4]
    by_token = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_token]),
                            use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(stop_token)
    assert by_token.token_ids == full.token_ids[: first + 1] and by_token.stop_reason == stop_token


def test_min_tokens_and_eos(llm):
    eos = llm.get_tokenizer().eos_token_id
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, stop_token_ids=[eos])
    completion = llm.generate(["Hello"], params, use_tqdm=False)[0].outputs[0]
    assert len(completion.token_ids) == 8 and eos not in completion.token_ids


def test_n_samples(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=0, ignore_eos=True)
    output = llm.generate(["Hello"], params, use_tqdm=False)[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_chat_uses_the_template(llm):
    output = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, ignore_eos=True),
                      use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert output.prompt_token_ids == list(expected)
    assert output.prompt == llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert len(output.outputs[0].token_ids) == 4


def test_model_without_tokenizer_runs_token_ids(bare_llm):
    assert bare_llm.get_tokenizer() is None
    output = bare_llm.generate({"prompt_token_ids": [4, 5, 6]}, SamplingParams(max_tokens=3, ignore_eos=True),
                               use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 3 and output.outputs[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        bare_llm.generate("text", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need detokenized text: this model has no tokenizer"):
        bare_llm.generate({"prompt_token_ids": [4, 5]}, SamplingParams(stop=["x"]), use_tqdm=False)


def test_stop_strings_without_detokenizing_are_refused(llm):
    with pytest.raises(ValueError, match="detokenize is False; use stop_token_ids"):
        llm.generate("Hello", SamplingParams(stop=["x"], detokenize=False), use_tqdm=False)


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1, 10**6]}, "out of the vocabulary"),
    ({"prompt_token_ids": [1] * 120}, "maximum context length is 128"),
    ({"nothing": 1}, "'prompt' or 'prompt_token_ids'"),
    (42, "must be a string"),
])
def test_bad_prompts_raise_and_leave_engine_usable(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["fine", prompt], SamplingParams(max_tokens=16), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("fine", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("n", 0),
    ("min_p", 2.0), ("presence_penalty", 5.0), ("logprobs", -1), ("min_tokens", -1),
    # wrong types: strings, None, bools where numbers belong, numbers where bools belong
    ("temperature", "0.5"), ("top_p", None), ("presence_penalty", None), ("stop", 5), ("stop_token_ids", 5),
    ("max_tokens", True), ("n", True), ("logprobs", True), ("ignore_eos", "yes"), ("detokenize", 1),
    # out of range or not finite
    ("top_k", -5), ("seed", 2**70), ("repetition_penalty", float("inf")), ("temperature", float("nan")),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FancyNewForCausalLM"], "model_type": "llama", '
                                          '"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, '
                                          '"num_attention_heads": 1, "intermediate_size": 8}')
    with pytest.raises(ValueError, match="Supported architectures: .*LlamaForCausalLM"):
        LLM(str(tmp_path), device="cpu")


def test_pickle_weights_refused_unless_allowed(tiny_model_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder, _ = tiny_model_factory("gpt2")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle_weights"):
        LLM(str(tmp_path), device="cpu", max_model_len=64)
    llm = LLM(str(tmp_path), device="cpu", max_model_len=64, allow_pickle_weights=True)
    assert llm.generate({"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_missing_model_path_says_what_to_pass():
    with pytest.raises(FileNotFoundError, match="Hugging Face model folder"):
        LLM("/no/such/model", device="cpu")


def test_requests_that_could_never_run_are_refused(llm):
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.generate("Hello", SamplingParams(n=300), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary size"):
        llm.generate("Hello", SamplingParams(logprobs=10_000), use_tqdm=False)
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate({"prompt": "Hello", "cache_salt": 123}, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_stop_strings_below_min_tokens_leave_the_text_whole(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate(["Hello"], greedy, use_tqdm=False)[0].outputs[0]
    stop = full.text[1:3]
    held = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, ignore_eos=True,
                                                  stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert held.token_ids == full.token_ids and held.text == full.text


def test_vllm_only_arguments_are_accepted_or_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        LLM(str(tmp_path), device="cpu", tensor_parallel_size=0)


def test_loading_options_give_the_same_model(tiny_model_factory, tmp_path, capsys):
    """A sharded checkpoint (index file) loads to the same outputs as one file; the dtype and
    load_format options, skip_tokenizer_init and the progress bar do what they say."""
    folder, hf_model = tiny_model_factory("llama", with_tokenizer=True)
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    prompt = {"prompt_token_ids": [5, 9, 14, 3]}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def greedy(path, **options) -> list[int]:
        llm = LLM(str(path), device="cpu", max_model_len=64, trust_remote_code=True, tensor_parallel_size=1,
                  **options)
        return llm.generate(prompt, params, use_tqdm=options.get("skip_tokenizer_init", False))[0] \
            .outputs[0].token_ids

    reference = greedy(folder, dtype="float32")
    assert greedy(sharded, dtype="float32", skip_tokenizer_init=True) == reference
    assert "Generating" in capsys.readouterr().err  # the progress bar
    bf16 = LLM(str(folder), device="cpu", dtype="bfloat16", max_model_len=64)
    assert bf16.llm_engine.dtype == torch.bfloat16 and next(bf16.llm_engine.core.model.parameters()).dtype == torch.bfloat16
    assert len(bf16.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids) == 8
    dummy = greedy(folder, dtype="float32", load_format="dummy")
    assert len(dummy) == 8 and dummy != reference  # random weights, not the checkpoint's


def test_missing_checkpoint_tensor_is_named_as_in_the_checkpoint(tiny_model_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = tiny_model_factory("llama")
    shutil.copytree(folder, tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensors: model\.layers\.0\.self_attn\.q_proj\.weight$"):
        LLM(str(tmp_path / "model"), device="cpu")


def test_hf_folders_load_without_the_gguf_package(tiny_model_factory):
    """The GPU images carry no ``gguf``: only GGUF files may need it."""
    import subprocess
    import sys

    folder, _ = tiny_model_factory("llama")
    script = ("import sys; sys.modules['gguf'] = None\n"
              "from octavo import LLM, SamplingParams\n"
              f"llm = LLM({str(folder)!r}, device='cpu', max_model_len=32)\n"
              "print(len(llm.generate({'prompt_token_ids': [5, 6]}, SamplingParams(max_tokens=3, ignore_eos=True),"
              " use_tqdm=False)[0].outputs[0].token_ids))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "3"


@pytest.mark.parametrize("engine_core_process", [False, True], ids=["in-process", "core-process"])
def test_a_dropped_llm_frees_its_engine(tiny_model_factory, engine_core_process):
    """An LLM dropped without shutdown() (a notebook cell run again, a test) leaves nothing alive:
    the in-process core is collected, and the core's process is stopped."""
    import gc
    import weakref

    folder, _ = tiny_model_factory("llama")
    llm = LLM(str(folder), device="cpu", dtype="float32", engine_core_process=engine_core_process,
              max_model_len=64, kv_cache_memory=8 << 20)
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3), use_tqdm=False)
    client = llm.llm_engine.core_client
    watched = weakref.ref(llm.llm_engine.core if not engine_core_process else client)
    process = None if not engine_core_process else client._process.process
    del llm, client
    gc.collect()
    assert watched() is None
    if process is not None:
        assert process.wait(timeout=30) is not None
