"""Data parallelism: the router on its own, then two replicas (local processes, and opt-in Ray
actors) serving the tiny models: same greedy outputs as one engine, prefix routing seen in the
per-replica metrics, a shared prefix computed once per replica, a killed replica reported while
the other answers.

Ray tests: ``OCTAVO_RUN_RAY=1 pytest tests/test_data_parallel.py -k ray`` (they start a local Ray
instance, about half a minute).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from octavo.engine.data_parallel import PrefixRouter, plan_local_replicas
from octavo.engine.messages import CoreRequest
from octavo.llm import LLM
from octavo.sampling_params import SamplingParams
from tests.conftest import _llama_config
from tests.test_server import MODEL, start_server, wait_until

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
run_ray = pytest.mark.skipif(os.environ.get("OCTAVO_RUN_RAY") != "1" and os.environ.get("OCTAVO_RUN_SLOW") != "1",
                             reason="Ray test; set OCTAVO_RUN_RAY=1 to run")


def _request(core_id: int, tokens: list[int], salt=None) -> CoreRequest:
    return CoreRequest(core_id, tokens, {}, 0.0, salt)


def _prompt(prefix: int, suffix: int, length: int = 40) -> list[int]:
    """Token ids: a 32-token prefix chosen by ``prefix`` (two full blocks), then ``suffix``'s tokens."""
    head = [3 + (prefix * 7 + i) % 200 for i in range(32)]
    return head + [3 + (suffix * 13 + i) % 200 for i in range(length - 32)]


# ---- the router ---------------------------------------------------------------------------------
def test_router_keeps_a_prefix_on_its_replica_and_holds_followers_until_the_leader_answers():
    router = PrefixRouter(2, BLOCK, overload_tokens=1000)
    assert router.route(_request(0, _prompt(0, 0))) == (0, True)  # leader of prefix 0 on replica 0
    assert router.route(_request(1, _prompt(1, 0))) == (1, True)  # a new prefix: the less used replica
    assert router.route(_request(2, _prompt(0, 1))) == (0, False)  # same first block: held behind 0
    assert router.route(_request(3, _prompt(0, 1), salt="tenant")) == (1, True)  # another salt, another key
    assert router.waiting_tokens == [80, 80]
    assert [request.core_id for request in router.on_output(0, finished=False)] == [2]
    assert router.waiting_tokens == [40, 80]
    assert router.route(_request(4, _prompt(0, 2))) == (0, True)  # prefix cached there now: sent at once
    assert router.replica_of(4) == 0 and router.replica_of(3) == 1
    assert router.waiting_tokens == [80, 80]
    assert router.route(_request(5, [5] * 7)) == (1, True)  # no full block; a tie goes to fewer routed


def test_router_spills_an_overloaded_prefix_to_the_least_loaded_replica():
    router = PrefixRouter(2, BLOCK, overload_tokens=100)
    replicas = [router.route(_request(core_id, _prompt(0, core_id)))[0] for core_id in range(6)]
    # Replica 0 takes the prefix until it is 100 tokens ahead; then replica 1 joins the prefix.
    assert replicas[:4] == [0, 0, 0, 1]
    assert sorted(set(replicas)) == [0, 1] and abs(replicas.count(0) - replicas.count(1)) <= 2


def test_router_forgets_aborted_and_dead():
    router = PrefixRouter(2, BLOCK, overload_tokens=1000)
    router.route(_request(0, _prompt(0, 0)))
    router.route(_request(1, _prompt(0, 1)))  # held behind 0
    assert router.forget(1) == (0, False, [])  # never sent: nothing to abort in a core
    router.route(_request(2, _prompt(0, 2)))
    replica, sent, released = router.forget(0)  # the leader aborted: its follower goes now
    assert (replica, sent, [request.core_id for request in released]) == (0, True, [2])
    router.mark_dead(0)
    assert router.waiting_tokens[0] == 0 and router.replica_of(2) is None
    assert router.route(_request(3, _prompt(0, 3)))[0] == 1
    router.mark_dead(1)
    with pytest.raises(Exception, match="every engine replica is dead"):
        router.route(_request(4, _prompt(0, 4)))


def test_local_replicas_split_gpus_and_their_memory_share():
    from octavo.config import CacheConfig, EngineConfig

    config = EngineConfig(model="m", device="cpu", data_parallel_size=2)
    config.device = "cuda"  # planning only: no GPU is touched
    config.cache = CacheConfig(gpu_memory_utilization=0.9)
    plans = plan_local_replicas(config, gpus=["0"])
    assert [plan.env["CUDA_VISIBLE_DEVICES"] for plan in plans] == ["0", "0"]
    assert [plan.config.cache.gpu_memory_utilization for plan in plans] == [0.45, 0.45]
    plans = plan_local_replicas(config, gpus=["2", "5"])
    assert [plan.env["CUDA_VISIBLE_DEVICES"] for plan in plans] == ["2", "5"]
    assert [plan.config.cache.gpu_memory_utilization for plan in plans] == [0.9, 0.9]
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1"):
        EngineConfig(model="m", data_parallel_size=0)
    with pytest.raises(ValueError, match="leave engine_core_process unset"):
        EngineConfig(model="m", data_parallel_size=2, engine_core_process=False)


# ---- two local replicas ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tiny_model_factory) -> Path:
    folder, _ = tiny_model_factory("llama", with_tokenizer=True)
    return folder


def _per_replica(url: str, name: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                replica = sample.labels["replica"]
                values[replica] = values.get(replica, 0.0) + sample.value
    return values


def test_two_replicas_serve_like_one_engine_and_route_by_prefix(model_folder):
    prompts = [_prompt(prefix, suffix) for suffix in range(3) for prefix in range(2)]  # A B A B A B
    reference = LLM(str(model_folder), device="cpu", dtype="float32", kv_cache_memory=2 << 20,
                    engine_core_process=False).generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                        use_tqdm=False)
    server = start_server(model_folder, engine_options={"data_parallel_size": 2})
    try:
        client = server.client()
        for prompt, expected in zip(prompts, reference):
            result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
            assert result.choices[0].text == expected.outputs[0].text
        assert wait_until(lambda: _per_replica(server.url, "octavo:prefill_tokens_computed_total").get("total") == 112)
        success = _per_replica(server.url, "octavo:request_success_total")
        assert success == {"0": 3, "1": 3, "total": 6}
        # Each replica computed its prefix once: 40 tokens, then 8 for each later prompt.
        assert _per_replica(server.url, "octavo:prefill_tokens_computed_total") == {"0": 56, "1": 56, "total": 112}
        hits = _per_replica(server.url, "octavo:prefix_cache_hits_total")
        assert hits == {"0": 64, "1": 64, "total": 128}
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()


def test_a_killed_replica_is_reported_while_the_other_answers(model_folder):
    server = start_server(model_folder, faults={"step_delay_s": 0.05}, engine_options={"data_parallel_size": 2})
    try:
        client = server.client()
        stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        engine = server.engine
        (victim,) = {progress.replica for progress in engine._progress.values()}
        os.kill(engine.client.replicas[victim].process.pid, signal.SIGKILL)
        with pytest.raises(Exception) as failure:
            for _ in stream:
                pass
        assert f"engine replica {victim} is dead" in str(failure.value)
        assert wait_until(lambda: victim in engine.dead_replicas, 10)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 200
        assert health.json() == {"status": "degraded", "replicas": 2, "dead_replicas": [victim]}
        for _ in range(3):  # everything goes to the live replica now
            result = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=4, temperature=0)
            assert result.choices[0].finish_reason == "length"
        assert not engine.is_dead
    finally:
        server.stop()


def test_shared_prefix_is_computed_once_per_replica(tmp_path):
    """The CPU target: 200 requests behind a 1,000-token common prefix, two replicas."""
    import transformers

    transformers.LlamaForCausalLM(_llama_config(max_position_embeddings=2048)).save_pretrained(tmp_path)
    prefix = [3 + (i * 7) % 250 for i in range(1000)]
    prompts = [{"prompt_token_ids": prefix + [3 + (n * 11 + i) % 250 for i in range(8)]} for n in range(200)]
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_memory=32 << 20, data_parallel_size=2,
              max_num_seqs=256)
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                               use_tqdm=False)
        assert all(len(output.outputs[0].token_ids) == 2 for output in outputs)
        replicas = llm.llm_engine.core_client.replicas
        routed = llm.llm_engine.core_client.router.num_routed
        cached = 1000 // BLOCK * BLOCK  # the prefix's full blocks
        for replica, count in zip(replicas, routed):
            assert count > 0
            computed = replica.stats().num_prefill_tokens_computed
            assert computed == 1008 + (count - 1) * (1008 - cached), (routed, computed)
    finally:
        llm.llm_engine.shutdown()


# ---- Ray (opt-in) ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@run_ray
def test_ray_actors_serve_like_one_engine_and_a_killed_one_is_reported(local_ray, model_folder):
    prompts = [_prompt(prefix, suffix) for suffix in range(2) for prefix in range(2)]
    reference = LLM(str(model_folder), device="cpu", dtype="float32", kv_cache_memory=2 << 20,
                    engine_core_process=False).generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                        use_tqdm=False)
    server = start_server(model_folder, engine_options={"data_parallel_size": 2,
                                                        "distributed_executor_backend": "ray"})
    try:
        client = server.client()
        for prompt, expected in zip(prompts, reference):
            result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
            assert result.choices[0].text == expected.outputs[0].text
        assert wait_until(lambda: _per_replica(server.url, "octavo:request_success_total") ==
                          {"0": 2, "1": 2, "total": 4})
        local_ray.kill(server.engine.client.replicas[1].process.actor, no_restart=True)
        assert wait_until(lambda: 1 in server.engine.dead_replicas, 20)
        assert httpx.get(f"{server.url}/health").json()["status"] == "degraded"
        result = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=6, temperature=0)
        assert result.choices[0].text == reference[0].outputs[0].text
    finally:
        server.stop()


@run_ray
def test_ray_llm_offline(local_ray, model_folder):
    prompts = [{"prompt_token_ids": _prompt(0, suffix)} for suffix in range(4)]
    one = LLM(str(model_folder), device="cpu", dtype="float32", kv_cache_memory=2 << 20,
              engine_core_process=False).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(str(model_folder), device="cpu", dtype="float32", kv_cache_memory=2 << 20, data_parallel_size=2,
              distributed_executor_backend="ray")
    try:
        two = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in two]
    finally:
        llm.llm_engine.shutdown()
