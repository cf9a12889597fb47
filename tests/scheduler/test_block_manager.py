"""BlockManager unit and property tests (pure Python, no model)."""

from __future__ import annotations

import pytest
from _sched_helpers import make_request
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.scheduler import BlockManager, PrefixHit, hash_block_tokens

BS = 4


def computed(bm: BlockManager, request, num_tokens: int | None = None) -> None:
    """Pretend the runner computed the request's KV up to num_tokens (default: all)."""
    request.num_computed_tokens = request.num_tokens if num_tokens is None else num_tokens
    bm.cache_computed_blocks(request, request.num_computed_tokens)


def admit(bm: BlockManager, request) -> PrefixHit:
    """Admission as the scheduler does it: look up the prefix, then allocate the rest."""
    hit = bm.get_computed_blocks(request)
    assert bm.allocate_slots(request, request.num_tokens - hit.num_tokens, hit) is not None
    request.num_computed_tokens = hit.num_tokens
    return hit


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    req = make_request(9)
    new = bm.allocate_slots(req, 9)
    assert len(new) == 3 and len(set(new)) == 3  # cdiv(9, 4)
    assert bm.get_block_ids(req.request_id) == new
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    assert all(bm.ref_count(b) == 1 for b in new)
    bm.free(req)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in new)
    bm.check_invariants()


def test_growing_request_gets_one_block_per_block_size_tokens():
    bm = BlockManager(num_blocks=8, block_size=BS)
    req = make_request(3)
    assert len(bm.allocate_slots(req, 3)) == 1
    req.num_computed_tokens = 3
    assert bm.allocate_slots(req, 1) == []  # position 3 still fits in block 0
    req.num_computed_tokens = 4
    assert len(bm.allocate_slots(req, 1)) == 1  # position 4 opens block 1
    assert len(bm.get_block_ids(req.request_id)) == 2


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a, b = make_request(8), make_request(8)
    assert bm.allocate_slots(a, 8) is not None
    assert bm.allocate_slots(b, 8) is None
    assert bm.get_block_ids(b.request_id) == [] and bm.num_free_blocks == 1
    bm.check_invariants()


def test_shared_prefix_is_ref_counted():
    bm = BlockManager(num_blocks=10, block_size=BS)
    tokens = list(range(10))
    a = make_request(tokens)
    admit(bm, a)
    computed(bm, a)
    assert bm.num_cached_blocks == 2  # blocks [0..3], [4..7]; the partial one is not cached
    b = make_request(tokens + [99])
    hit = admit(bm, b)
    assert hit.num_tokens == 8 and hit.num_evictable == 0
    shared = bm.get_block_ids(a.request_id)[:2]
    assert bm.get_block_ids(b.request_id)[:2] == shared
    assert [bm.ref_count(x) for x in shared] == [2, 2]
    bm.free(a)
    assert [bm.ref_count(x) for x in shared] == [1, 1]
    bm.free(b)
    assert [bm.ref_count(x) for x in shared] == [0, 0]
    assert bm.num_free_blocks == 10 and bm.num_cached_blocks == 2  # freed but still cached
    bm.check_invariants()


def test_hit_on_freed_cached_blocks_takes_them_back():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request(list(range(9)))
    admit(bm, a)
    computed(bm, a)
    bm.free(a)
    b = make_request(list(range(9)) + [5, 6])
    hit = bm.get_computed_blocks(b)
    assert hit.num_tokens == 8 and hit.num_evictable == 2
    assert bm.allocate_slots(b, 3, hit) is not None
    assert bm.num_free_blocks == 1
    bm.check_invariants()


def test_prefix_match_is_chained_not_per_block():
    """Block 1 equal but block 0 different: the chained hash must not match block 1."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    a = make_request(x + y + z + [0])
    admit(bm, a)
    computed(bm, a)
    assert bm.get_computed_blocks(make_request([7, 7, 7, 7] + y + z + [0])).num_tokens == 0
    assert bm.get_computed_blocks(make_request(x + y + [3, 3, 3, 3, 0])).num_tokens == 8
    assert bm.get_computed_blocks(make_request(x + y + z + [1, 2])).num_tokens == 12


def test_full_prompt_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request(list(range(8)))  # exactly two full blocks
    admit(bm, a)
    computed(bm, a)
    same = make_request(list(range(8)))
    hit = bm.get_computed_blocks(same)
    assert hit.num_tokens == 4  # the second block is recomputed for the last token's logits
    longer = make_request(list(range(9)))
    assert bm.get_computed_blocks(longer).num_tokens == 8


def test_partial_blocks_are_never_cached():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request(list(range(6)))
    admit(bm, a)
    computed(bm, a)
    assert bm.num_cached_blocks == 1
    b = make_request(list(range(6)) + [50, 51, 52])
    assert bm.get_computed_blocks(b).num_tokens == 4


def test_only_computed_blocks_are_cached():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request(list(range(12)))
    admit(bm, a)
    computed(bm, a, 5)  # a prefill chunk of 5 tokens: one full block has KV
    assert bm.num_cached_blocks == 1
    assert bm.get_computed_blocks(make_request(list(range(13)))).num_tokens == 4
    computed(bm, a, 12)
    assert bm.get_computed_blocks(make_request(list(range(13)))).num_tokens == 12


def test_decode_blocks_are_cached_as_they_fill():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request([1, 2, 3])
    admit(bm, a)
    for token in [4, 5, 6, 7, 8]:  # one decode step per token
        computed(bm, a)
        a.output_token_ids.append(token)
        assert bm.allocate_slots(a, 1) is not None
    computed(bm, a)
    follower = make_request([1, 2, 3, 4, 5, 6, 7, 8, 9])  # prompt == a's prompt + outputs
    assert bm.get_computed_blocks(follower).num_tokens == 8


def test_lru_eviction_takes_least_recently_freed_tails_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = make_request(list(range(9))), make_request(list(range(100, 109)))
    for r in (a, b):
        admit(bm, r)
        computed(bm, r)
    bm.free(a)  # cached-free order: a1, a0, then b1, b0 (tails first)
    bm.free(b)
    probe_a, probe_b = make_request(list(range(10))), make_request(list(range(100, 110)))
    d = make_request(list(range(500, 512)))
    assert len(bm.allocate_slots(d, 12)) == 3  # 2 uncached free blocks + evicts a1
    assert bm.get_computed_blocks(probe_a).num_tokens == 4
    assert bm.get_computed_blocks(probe_b).num_tokens == 8
    d.num_computed_tokens = 12
    assert len(bm.allocate_slots(d, 1)) == 1  # evicts a0
    assert bm.get_computed_blocks(probe_a).num_tokens == 0
    assert bm.get_computed_blocks(probe_b).num_tokens == 8
    bm.check_invariants()


def test_hash_collisions_never_return_wrong_blocks():
    def colliding(parent: bytes, tokens: tuple[int, ...]) -> bytes:
        return b"same"  # every block hashes alike

    bm = BlockManager(num_blocks=16, block_size=BS, hash_fn=colliding)
    a = make_request([1, 2, 3, 4, 5, 6, 7, 8, 0])
    admit(bm, a)
    computed(bm, a)
    assert bm.get_computed_blocks(make_request([9, 9, 9, 9, 0])).num_tokens == 0
    b = make_request([9, 9, 9, 9, 5, 5, 5, 5, 0])
    admit(bm, b)
    computed(bm, b)  # its blocks collide with a's: not registered, a's entry kept
    assert bm.get_computed_blocks(make_request([1, 2, 3, 4, 0])).num_tokens == 4
    bm.check_invariants()


def test_hash_is_chained_stable_and_128_bit():
    h0 = hash_block_tokens(b"", (1, 2, 3, 4))
    assert len(h0) == 16 and h0 == hash_block_tokens(b"", (1, 2, 3, 4))
    assert hash_block_tokens(h0, (5, 6, 7, 8)) != hash_block_tokens(b"", (5, 6, 7, 8))
    assert hash_block_tokens(b"", (1, 2, 3, 5)) != h0


def test_prefix_cache_counters_and_disabled_cache():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_request(list(range(9)))
    admit(bm, a)
    computed(bm, a)
    admit(bm, make_request(list(range(9))))
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (18, 8)
    off = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    c = make_request(list(range(9)))
    admit(off, c)
    computed(off, c)
    assert off.num_cached_blocks == 0 and off.get_computed_blocks(make_request(list(range(9)))).num_tokens == 0


# ---------------------------------------------------------------------- property test
# Each op: (kind, index, token choice). Prompts come from a tiny alphabet so prefixes repeat.
ops_strategy = st.lists(
    st.tuples(st.sampled_from(["new", "grow", "free"]), st.integers(0, 50), st.lists(st.integers(0, 2), max_size=14)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, num_blocks=st.integers(1, 12))
def test_random_ops_keep_invariants_and_hits_are_exact(ops, num_blocks):
    bm = BlockManager(num_blocks=num_blocks, block_size=2)
    live = []
    content: dict[int, tuple] = {}  # block id -> (position in request, prefix tokens) written there
    for kind, index, tokens in ops:
        if kind == "new" and tokens:
            req = make_request(tokens)
            hit = bm.get_computed_blocks(req)
            for i, block_id in enumerate(hit.block_ids):  # an independent check of every hit
                assert content[block_id] == tuple(tokens[: (i + 1) * 2])
            if bm.allocate_slots(req, req.num_tokens - hit.num_tokens, hit) is not None:
                req.num_computed_tokens = hit.num_tokens
                live.append(req)
        elif kind == "grow" and live:
            req = live[index % len(live)]
            if bm.allocate_slots(req, req.num_tokens - req.num_computed_tokens) is None:
                continue
            req.num_computed_tokens = req.num_tokens  # the step ran: KV for all tokens
            blocks = bm.get_block_ids(req.request_id)
            for i in range(req.num_computed_tokens // 2):
                content[blocks[i]] = tuple(req.all_token_ids[: (i + 1) * 2])
            bm.cache_computed_blocks(req, req.num_computed_tokens)
            req.output_token_ids.append(index % 3)  # the sampled token, not computed yet
        elif kind == "free" and live:
            bm.free(live.pop(index % len(live)))
        for req in live:  # enough blocks for the computed tokens, never more than all need
            held = len(bm.get_block_ids(req.request_id))
            assert -(-req.num_computed_tokens // 2) <= held <= -(-req.num_tokens // 2)
        bm.check_invariants()
    for req in live:
        bm.free(req)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks and bm.num_assigned_blocks == 0
