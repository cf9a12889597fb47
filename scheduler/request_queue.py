"""The waiting queue: FCFS with optional priority (lower value first, then arrival)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from kiln.scheduler.request import Request


class WaitingQueue:
    """Requests waiting for admission, served in ``(priority, arrival_time, insertion)`` order.

    With equal priorities this is plain FCFS. A preempted request goes back in under its
    original key; since admission is strictly in order, it arrived before every request
    still waiting at equal priority and so resumes first.

    Invariants: ``len(self)`` counts live requests only; removal is lazy (the heap entry
    is blanked and skipped when it surfaces), so push, pop and remove are O(log n) / O(1).
    """

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._entries: dict[str, list] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def push(self, request: Request) -> None:
        assert request.request_id not in self._entries, f"request {request.request_id} queued twice"
        entry = [request.priority, request.arrival_time, next(self._counter), request]
        self._entries[request.request_id] = entry
        heapq.heappush(self._heap, entry)

    def peek(self) -> Request | None:
        heap = self._heap
        while heap and heap[0][-1] is None:
            heapq.heappop(heap)
        return heap[0][-1] if heap else None

    def pop(self) -> Request:
        request = self.peek()
        if request is None:
            raise IndexError("pop from an empty WaitingQueue")
        heapq.heappop(self._heap)
        del self._entries[request.request_id]
        return request

    def remove(self, request_id: str) -> Request | None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        request = entry[-1]
        entry[-1] = None
        return request

    def __iter__(self) -> Iterator[Request]:
        """Live requests in service order (O(n log n); for tests and debugging)."""
        return iter([entry[-1] for entry in sorted(self._entries.values(), key=lambda e: e[:3])])
