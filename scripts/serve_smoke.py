"""Smoke test of a running OpenAI-compatible server with the official ``openai`` client.

    python scripts/serve_smoke.py wait  http://127.0.0.1:8000 --timeout 300
    python scripts/serve_smoke.py check http://127.0.0.1:8000 --output smoke.json

``check`` runs completions (token ids, text), streaming completions, chat, streaming chat and an
over-long prompt, greedy with ``ignore_eos``: every answer must carry exactly the tokens asked
for, streamed text must equal the unstreamed text, and the over-long prompt must get a 400.
Chat and text prompts are reported as skipped when the server has no tokenizer or template.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

MAX_TOKENS = 16
IDS = list(range(100, 132))


def wait(url: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    print(f"{url} is up")
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    print(f"{url}/health did not answer 200 within {timeout_s:g} s", file=sys.stderr)
    return 1


def _no_text_support(error: Exception) -> bool:
    message = str(error).lower()
    return "tokenizer" in message or "chat template" in message


def check(url: str, output: str | None) -> int:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0]
    greedy: dict[str, Any] = dict(max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True})
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, test: Callable[[], str]) -> None:
        try:
            results[name] = {"status": "ok", "detail": test()}
        except openai.BadRequestError as error:
            status = "skipped" if _no_text_support(error) else "FAILED"
            results[name] = {"status": status, "detail": f"{type(error).__name__}: {error}"}
        except Exception as error:  # noqa: BLE001 - every failure is reported, the other checks still run
            results[name] = {"status": "FAILED", "detail": f"{type(error).__name__}: {error}"}

    def expect(condition: bool, message: str) -> None:
        if not condition:
            raise AssertionError(message)

    def completion(prompt) -> tuple[str, int]:
        answer = client.completions.create(model=model.id, prompt=prompt, **greedy)
        expect(answer.usage.completion_tokens == MAX_TOKENS, f"usage says {answer.usage.completion_tokens} tokens")
        expect(answer.choices[0].finish_reason == "length", f"finish_reason {answer.choices[0].finish_reason}")
        return answer.choices[0].text, answer.usage.prompt_tokens

    def completion_ids() -> str:
        text, prompt_tokens = completion(IDS)
        expect(prompt_tokens == len(IDS), f"usage says {prompt_tokens} prompt tokens, sent {len(IDS)}")
        expect(completion(IDS)[0] == text, "two greedy answers to the same prompt differ")
        return f"{MAX_TOKENS} tokens: {text[:60]!r}"

    def streamed(create, piece: Callable[[Any], str]) -> tuple[str, Any, int]:
        parts, usage, chunks = [], None, 0
        for chunk in create(stream=True, stream_options={"include_usage": True}, **greedy):
            if chunk.choices:
                parts.append(piece(chunk.choices[0]) or "")
                chunks += 1
            usage = chunk.usage or usage
        expect(usage is not None and usage.completion_tokens == MAX_TOKENS, f"streamed usage {usage}")
        return "".join(parts), usage, chunks

    def completion_stream() -> str:
        text, _, chunks = streamed(lambda **kw: client.completions.create(model=model.id, prompt=IDS, **kw),
                                   lambda choice: choice.text)
        expect(text == completion(IDS)[0], "the streamed text differs from the unstreamed one")
        return f"{chunks} chunks, text equals the unstreamed answer"

    messages = [{"role": "user", "content": "Say something."}]

    def chat() -> str:
        answer = client.chat.completions.create(model=model.id, messages=messages, **greedy)
        expect(answer.usage.completion_tokens == MAX_TOKENS, f"usage says {answer.usage.completion_tokens} tokens")
        return f"{MAX_TOKENS} tokens: {answer.choices[0].message.content[:60]!r}"

    def chat_stream() -> str:
        text, _, chunks = streamed(lambda **kw: client.chat.completions.create(model=model.id, messages=messages,
                                                                               **kw),
                                   lambda choice: choice.delta.content)
        whole = client.chat.completions.create(model=model.id, messages=messages, **greedy)
        expect(text == whole.choices[0].message.content, "the streamed chat text differs from the unstreamed one")
        return f"{chunks} chunks, text equals the unstreamed answer"

    def too_long() -> str:
        limit = getattr(model, "max_model_len", None) or (model.model_extra or {}).get("max_model_len")
        expect(limit is not None, "/v1/models states no max_model_len")
        try:
            client.completions.create(model=model.id, prompt=[100] * limit, **greedy)
        except openai.BadRequestError as error:
            return f"400: {error.body.get('message', error) if isinstance(error.body, dict) else error}"[:160]
        raise AssertionError(f"a {limit}-token prompt was accepted")

    run("completion (token ids)", completion_ids)
    run("completion (text)", lambda: f"{MAX_TOKENS} tokens: {completion('The capital of France is')[0][:60]!r}")
    run("completion, streamed", completion_stream)
    run("chat", chat)
    run("chat, streamed", chat_stream)
    run("over-long prompt", too_long)
    run("still serving", lambda: completion_ids())
    width = max(map(len, results))
    for name, result in results.items():
        print(f"{name:<{width}}  {result['status']:<7}  {result['detail']}")
    if output:
        Path(output).write_text(json.dumps({"model": model.id, "checks": results}, indent=2) + "\n")
    return 1 if any(result["status"] == "FAILED" for result in results.values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["wait", "check"])
    parser.add_argument("url", help="the server, without /v1")
    parser.add_argument("--timeout", type=float, default=300.0, help="wait: seconds to wait for /health")
    parser.add_argument("--output", default=None, help="check: write the results to this JSON file")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    return wait(url, args.timeout) if args.what == "wait" else check(url, args.output)


if __name__ == "__main__":
    sys.exit(main())
