"""The speculative-decoding metrics on /metrics, from the engine's cumulative counters."""

from __future__ import annotations

from kiln.runtime.outputs import EngineStats
from kiln.scheduler.speculation import SpecDecodeStats
from kiln.server.metrics import ServerMetrics

from .helpers import metric


def test_draft_counters_and_acceptance_length_histogram():
    # 4 verify steps: one accepted nothing, two accepted one draft, one accepted two.
    spec = SpecDecodeStats(num_draft_tokens=10, num_accepted_tokens=4, acceptance_counts=(1, 2, 1))
    stats = EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                        prefix_cache_hits=0, num_preemptions=0, prompt_tokens=0, generation_tokens=0,
                        spec_decode=spec)
    text = ServerMetrics(lambda: stats, "m").render().decode()
    assert metric(text, "kiln:spec_decode_num_draft_tokens_total", model_name="m") == 10
    assert metric(text, "kiln:spec_decode_num_accepted_tokens_total", model_name="m") == 4
    buckets = [metric(text, "kiln:spec_decode_acceptance_length_bucket", model_name="m", le=le)
               for le in ("1.0", "2.0", "3.0", "+Inf")]
    assert buckets == [1, 3, 4, 4]
    assert metric(text, "kiln:spec_decode_acceptance_length_sum", model_name="m") == 1 * 1 + 2 * 2 + 3 * 1
    assert metric(text, "kiln:spec_decode_acceptance_length_count", model_name="m") == 4
