"""lm-evaluation-harness (`lm-eval`) against `serve-llm` on the real SmolLM2 engine: a small local
task (a JSONL and task YAMLs written to tmp_path) through `local-completions` (multiple choice, scored
by echo + logprobs) and `local-chat-completions` (generate_until). References: the offline
``kiln.runtime.LLM`` on the same engine (prompt_logprobs, greedy chat). No network: lm-eval's
tokenizer is the engine directory's own, the dataset a local file.
"""

from __future__ import annotations

import json

import pytest

from kiln.scheduler.sampling_params import SamplingParams

# The serve-llm and offline LLM fixtures of the other app-client tests (module-scoped: one each here too).
from .test_apps import MODEL, offline, server  # noqa: F401

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["five", "four", "seven"], "answer": 1},
    {"question": "The colour of the sky on a clear day is", "choices": ["green", "red", "blue"], "answer": 2},
]
N_CHOICES = sum(len(doc["choices"]) for doc in DOCS)
MAX_GEN_TOKS = 4
UNTIL = ["\n"]
TASKS = {
    "kiln_mc": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc"}]},
    "kiln_gen": {"output_type": "generate_until", "doc_to_target": "{{choices[answer]}}",
                 "generation_kwargs": {"until": UNTIL, "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """docs.jsonl plus one YAML per task (YAML is a superset of JSON, so json.dumps writes it)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    for name, config in TASKS.items():
        (folder / f"{name}.yaml").write_text(json.dumps({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{question}}", **config}))
    return folder


@pytest.fixture(scope="module")
def task_manager(task_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)  # indexing lm-eval's own tasks takes ~15 s


def _evaluate(task_manager, tmp_path, monkeypatch, task: str, model: str, model_args: dict, **kw) -> dict:
    """lm_eval.simple_evaluate on one local task, offline; returns its results dict (samples logged)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                   task_manager=task_manager, **kw)


def test_multiple_choice_loglikelihoods_equal_offline(server, offline, smollm2_engine_dir, task_manager, tmp_path,
                                                      monkeypatch):
    results = _evaluate(task_manager, tmp_path, monkeypatch, "kiln_mc", "local-completions", {
        "model": MODEL, "base_url": server + "/v1/completions", "tokenizer_backend": "huggingface",
        "tokenizer": str(smollm2_engine_dir), "tokenized_requests": True, "max_retries": 1},
        batch_size=N_CHOICES)  # all choices in one request
    samples = sorted(results["samples"]["kiln_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    tok = offline.get_tokenizer()
    # lm-eval's split: (question, " " + choice), the continuation being the tokens after the question's.
    pairs = [(tok.encode(d["question"], add_special_tokens=False),
              tok.encode(d["question"] + " " + c, add_special_tokens=False)) for d in DOCS for c in d["choices"]]
    refs = offline.generate([{"prompt_token_ids": whole} for _, whole in pairs],
                            SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    want = [sum(e.logprob for e in r.prompt_logprobs[len(ctx):]) for (ctx, _), r in zip(pairs, refs)]
    got = [resp[0][0] for s in samples for resp in s["resps"]]
    assert got == pytest.approx(want, abs=1e-3)
    picks, start = [], 0
    for doc in DOCS:
        lls = want[start:start + len(doc["choices"])]
        picks.append(lls.index(max(lls)) == doc["answer"])
        start += len(doc["choices"])
    assert results["results"]["kiln_mc"]["acc,none"] == pytest.approx(sum(picks) / len(DOCS))


def test_chat_generate_until_equals_offline_greedy(server, offline, task_manager, tmp_path, monkeypatch):
    results = _evaluate(task_manager, tmp_path, monkeypatch, "kiln_gen", "local-chat-completions", {
        "model": MODEL, "base_url": server + "/v1/chat/completions", "tokenizer_backend": "none",
        "tokenized_requests": False, "max_retries": 1,
        "num_concurrent": len(DOCS)}, apply_chat_template=True)
    samples = sorted(results["samples"]["kiln_gen"], key=lambda s: s["doc_id"])
    refs = offline.chat([[{"role": "user", "content": doc["question"]}] for doc in DOCS],
                        SamplingParams(temperature=0.0, max_tokens=MAX_GEN_TOKS, stop=UNTIL), use_tqdm=False)
    assert [s["resps"][0][0] for s in samples] == [r.outputs[0].text for r in refs]
    assert all(r.outputs[0].text for r in refs)
    want = [r.outputs[0].text.strip() == doc["choices"][doc["answer"]] for r, doc in zip(refs, DOCS)]
    assert results["results"]["kiln_gen"]["exact_match,none"] == pytest.approx(sum(want) / len(DOCS))
