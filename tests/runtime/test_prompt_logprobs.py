"""SamplingParams(prompt_logprobs=K) on the real SmolLM2 (fp32, CPU) against transformers'
log-softmax over the same prompt: chunked prefill, a prompt that would be a prefix-cache hit,
and a request without prompt logprobs in the same batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.runtime import LLM, SamplingParams
from kiln.scheduler.sampling_params import SamplingParamsError

pytestmark = pytest.mark.slow

TEXT = ("The Python Language Reference describes the syntax and core semantics of the language. "
        "It is terse, but attempts to be exact and complete.")


@pytest.fixture(scope="module")
def prompt(smollm2_hf_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_dir).encode(TEXT)


@pytest.fixture(scope="module")
def hf_logprobs(smollm2_hf_dir: Path, prompt: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)  # row p predicts token p + 1


def test_prompt_logprobs_match_transformers(smollm2_engine_dir: Path, prompt: list[int], hf_logprobs: torch.Tensor):
    k = 3
    # 11-token steps split the prompt into several prefill chunks; the second copy of the prompt
    # would hit the prefix cache (block 8) and must be computed anyway.
    with LLM(smollm2_engine_dir, device="cpu", max_num_tokens=11, block_size=8, max_model_len=256) as llm:
        params = [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=k),
                  SamplingParams(max_tokens=2, temperature=0.0),
                  SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0)]
        first = llm.generate({"prompt_token_ids": prompt}, params[0], use_tqdm=False)[0]
        outs = llm.generate([{"prompt_token_ids": prompt}] * 3, params, use_tqdm=False)
    assert outs[1].prompt_logprobs is None
    for out, want_k in ((first, k), (outs[0], k), (outs[2], 0)):
        lps = out.prompt_logprobs
        assert len(lps) == len(prompt) and lps[0] is None
        for position, entry in enumerate(lps[1:], start=1):
            row = hf_logprobs[position - 1]
            assert entry.token_id == prompt[position]
            assert entry.logprob == pytest.approx(float(row[prompt[position]]), abs=2e-4)
            top_lps, top_ids = row.topk(want_k)
            assert [t for t, _ in entry.top] == top_ids.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(top_lps.tolist(), abs=2e-4)


def test_prompt_logprobs_validated():
    with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=SamplingParams.MAX_LOGPROBS + 1)
