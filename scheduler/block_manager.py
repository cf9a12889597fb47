"""Paged KV cache bookkeeping: a pool of fixed-size blocks with ref counts and a prefix cache.

Pure Python, no torch: the runtime owns the KV tensors, this module only decides which
block ids each request writes to. A request's tokens ``[i * block_size, (i + 1) *
block_size)`` live in its i-th block.

Prefix caching: once a block is FULL and its KV is computed, it is registered under a
chained hash ``hash(parent_hash, block_tokens)``, so the hash of block i names the whole
prefix up to the end of block i. A later request whose leading blocks hash the same reuses
them (ref count + 1) instead of recomputing. Partial blocks are never cached (their content
still changes). Freed cached blocks are kept, in LRU order, and only evicted when the plain
free list is empty.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kiln.scheduler.request import Request

logger = logging.getLogger(__name__)

BlockHash = bytes
HashFn = Callable[[BlockHash, tuple[int, ...]], BlockHash]

# Parent hash of a request's first block.
ROOT_HASH: BlockHash = b""


def hash_block_tokens(parent_hash: BlockHash, token_ids: tuple[int, ...]) -> BlockHash:
    """128-bit chained digest of one full block; stable across processes and runs."""
    digest = hashlib.blake2b(parent_hash, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Block:
    """One KV block. ``ref_cnt`` counts the requests holding it; ``block_hash`` is set
    while its content is registered in the prefix cache (then ``parent_hash`` and
    ``token_ids`` are kept too, so a hit is verified token by token)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.parent_hash: BlockHash | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


@dataclass(frozen=True)
class PrefixHit:
    """The leading blocks of a request found in the prefix cache.

    ``num_tokens == len(block_ids) * block_size`` tokens need no compute. ``num_evictable``
    of the blocks are currently free (cached only), so taking them uses free capacity.
    Use a hit at once: it is only valid until the pool changes.
    """

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0
    num_evictable: int = 0


NO_HIT = PrefixHit()


class BlockManager:
    """Block pool with O(1) allocate/free, per-request block lists and a prefix cache.

    Invariants:
      * every block is in exactly one of: the free list (ref 0, uncached), the evictable
        LRU (ref 0, cached), or held by >= 1 request (ref == number of holders);
      * a request holding blocks holds ``cdiv(tokens it asked room for, block_size)``;
      * ``_cache[h].block_hash == h`` and only blocks with computed KV are registered.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: HashFn = hash_block_tokens,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn = hash_fn
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._evictable: OrderedDict[int, Block] = OrderedDict()  # least recently freed first
        self._cache: dict[BlockHash, Block] = {}
        self._req_blocks: dict[str, list[int]] = {}
        self._req_hashes: dict[str, list[BlockHash]] = {}  # hashes of the request's full blocks
        self._req_num_cached: dict[str, int] = {}  # leading blocks already offered to the cache
        self._num_assigned = 0  # sum of len(blocks) over requests (shared blocks per holder)
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take (free or cached-but-unused)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache)

    @property
    def num_assigned_blocks(self) -> int:
        """Sum over requests of the blocks each holds (a shared block counts per holder)."""
        return self._num_assigned

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (the manager's own list: do not mutate)."""
        return self._req_blocks.get(request_id, [])

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_cnt

    # ------------------------------------------------------------------ prefix cache
    def get_computed_blocks(self, request: Request) -> PrefixHit:
        """Longest cached prefix of the request's tokens, in whole blocks.

        At least the last token is always left to compute: the runner needs its logits to
        sample, so a hit covering every token drops its last block. A request asking for
        prompt logprobs gets no hit: every prompt token's logits must be computed.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        block_ids: list[int] = []
        num_evictable = 0
        parent = ROOT_HASH
        for i in range(max_blocks):
            block = self._cache.get(hashes[i])
            if block is None or block.parent_hash != parent or block.token_ids != self._tokens(request, i):
                break  # a miss, or a hash collision caught by the exact comparison
            block_ids.append(block.block_id)
            num_evictable += block.ref_cnt == 0
            parent = hashes[i]
        return PrefixHit(tuple(block_ids), len(block_ids) * self.block_size, num_evictable)

    def cache_computed_blocks(self, request: Request, num_computed: int) -> None:
        """Register the request's newly FULL, computed blocks so later requests can hit them:
        those within its first ``num_computed`` tokens, whose KV a step that has come back wrote
        (the caller says how many: ``num_computed_tokens`` may count a step still in flight)."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        # Only tokens whose ids are known: a pending token's KV may be computed already.
        num_full = min(num_computed, request.num_tokens) // self.block_size
        done = self._req_num_cached.get(rid, 0)
        if num_full <= done:
            return  # the common decode step: nothing new filled up
        hashes = self._block_hashes(request, num_full)
        held = self._req_blocks[rid]
        for i in range(done, num_full):
            if hashes[i] in self._cache:
                continue  # same content already cached (or a collision): keep the first
            block = self._blocks[held[i]]
            block.block_hash = hashes[i]
            block.parent_hash = hashes[i - 1] if i else ROOT_HASH
            block.token_ids = self._tokens(request, i)
            self._cache[hashes[i]] = block
        self._req_num_cached[rid] = num_full

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Chained hashes of the request's first ``num_blocks`` full blocks (memoised)."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else ROOT_HASH
            hashes.append(self._hash_fn(parent, self._tokens(request, i)))
        return hashes

    def _tokens(self, request: Request, block_index: int) -> tuple[int, ...]:
        """Token ids of one block, without concatenating the request's whole token list."""
        start = block_index * self.block_size
        end = start + self.block_size
        prompt = request.prompt_token_ids
        num_prompt = len(prompt)
        if end <= num_prompt:
            return tuple(prompt[start:end])
        outputs = request.output_token_ids
        if start >= num_prompt:
            return tuple(outputs[start - num_prompt : end - num_prompt])
        return tuple(prompt[start:]) + tuple(outputs[: end - num_prompt])

    # ------------------------------------------------------------------ allocation
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        prefix: PrefixHit | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for the request's KV up to ``num_computed_tokens + prefix.num_tokens +
        num_new_tokens (+ lookahead)`` tokens.

        ``prefix`` is given once, at admission (the request then holds no blocks), and its
        blocks are taken. Returns the ids of the newly allocated blocks (not the prefix
        ones), or None, changing nothing, when the pool cannot supply them.
        """
        rid = request.request_id
        held = self._req_blocks.get(rid)
        num_held = len(held) if held is not None else 0
        if (
            prefix is None
            and request.num_computed_tokens + num_new_tokens + num_lookahead_tokens <= num_held * self.block_size
        ):
            return []  # the common decode step: the last block still has room
        hit = prefix or NO_HIT
        total = request.num_computed_tokens + hit.num_tokens + num_new_tokens + num_lookahead_tokens
        num_needed = max(cdiv(total, self.block_size) - num_held - len(hit.block_ids), 0)
        num_evictable = sum(1 for b in hit.block_ids if self._blocks[b].ref_cnt == 0)
        if num_needed + num_evictable > self.num_free_blocks:
            return None
        if held is None:
            held = self._req_blocks[rid] = []
        if prefix is not None:
            assert num_held == 0, f"prefix given for request {rid} that already holds blocks"
            self._take_prefix(held, hit)
            self._req_num_cached[rid] = len(hit.block_ids)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += hit.num_tokens
        new_ids = [self._pop_free() for _ in range(num_needed)]
        held.extend(new_ids)
        self._num_assigned += len(hit.block_ids) + num_needed
        return new_ids

    def _take_prefix(self, held: list[int], hit: PrefixHit) -> None:
        for block_id in hit.block_ids:
            block = self._blocks[block_id]
            if block.ref_cnt == 0:
                del self._evictable[block_id]
            block.ref_cnt += 1
            held.append(block_id)

    def _pop_free(self) -> int:
        if self._free:
            block = self._blocks[self._free.pop()]
        else:
            # Evict the least recently freed cached block; its content is forgotten.
            _, block = self._evictable.popitem(last=False)
            del self._cache[block.block_hash]  # type: ignore[arg-type]
            block.block_hash = block.parent_hash = block.token_ids = None
        block.ref_cnt = 1
        return block.block_id

    def trim(self, request: Request) -> None:
        """Release the request's blocks past those its computed tokens need (the ones only
        rejected draft tokens used). Such blocks were never registered in the prefix cache:
        only full blocks of known tokens are, and the kept blocks cover every known token."""
        held = self._req_blocks.get(request.request_id)
        if not held:
            return
        keep = cdiv(request.num_computed_tokens, self.block_size)
        if keep >= len(held):
            return
        for block_id in reversed(held[keep:]):
            self._release_block(block_id)
        self._num_assigned -= len(held) - keep
        del held[keep:]

    def free(self, request: Request) -> None:
        """Release all blocks of the request (finished, aborted or preempted)."""
        rid = request.request_id
        self._req_hashes.pop(rid, None)
        self._req_num_cached.pop(rid, None)
        held = self._req_blocks.pop(rid, None)
        if not held:
            return
        # Free the tail first: among cached blocks the tail becomes the least recently
        # used, so eviction eats prefixes from their ends and shared heads live longest.
        for block_id in reversed(held):
            self._release_block(block_id)
        self._num_assigned -= len(held)
        logger.debug("freed %d blocks of request %s", len(held), rid)

    def _release_block(self, block_id: int) -> None:
        """One holder lets go of a block; unheld, it is free (or evictable while cached)."""
        block = self._blocks[block_id]
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            if block.block_hash is not None:
                self._evictable[block_id] = block
            else:
                self._free.append(block_id)

    def check_invariants(self) -> None:
        """Assert the pool's invariants (tests and debugging; O(num_blocks))."""
        holders = [0] * self.num_blocks
        for held in self._req_blocks.values():
            for block_id in held:
                holders[block_id] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & set(self._evictable), "a block is both free and evictable"
        for block in self._blocks:
            assert block.ref_cnt == holders[block.block_id], f"{block} has {holders[block.block_id]} holders"
            idle = block.block_id in free or block.block_id in self._evictable
            assert idle == (block.ref_cnt == 0), f"{block} idle={idle}"
            assert (block.block_id in self._evictable) <= (block.block_hash is not None)
            if block.block_hash is not None:
                assert self._cache[block.block_hash] is block
        assert len(self._cache) == sum(b.block_hash is not None for b in self._blocks)
        assert self._num_assigned == sum(holders)
