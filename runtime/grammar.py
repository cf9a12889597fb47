"""Structured output: grammars compiled from ``SamplingParams.structured_output`` (xgrammar)
and the per-row matchers that turn them into token masks.

Why xgrammar: it is what vLLM, SGLang and TensorRT-LLM use; it compiles JSON schemas, regexes,
EBNF and structural tags (tool calls) into a pushdown automaton whose per-token masks are
mostly precomputed (a mask costs microseconds to tens of microseconds on the host), it keeps
its own cache of compiled grammars, and it builds on the Hugging Face tokenizer we already
load. It is imported only when the first constrained request arrives (the import and the
vocabulary scan cost about a second on a CPU), so engines that never see one pay nothing.

The mask flow (runtime/model_runner.py): a step's forward is queued first; then the host waits
for the previous step's tokens (rows with a grammar advance their matcher by them), fills one
bitmask row per constrained request, copies it to the device and the sampler sets every
disallowed logit to -inf (runtime/sampler.py). Unconstrained rows carry no mask.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import numpy as np
import torch

from kiln.scheduler.block_manager import cdiv
from kiln.scheduler.sampling_params import StructuredOutput

logger = logging.getLogger(__name__)


class GrammarError(ValueError):
    """A constraint that cannot be compiled; ``param`` names the request field (OpenAI error param)."""

    def __init__(self, message: str, param: str = "structured_output") -> None:
        super().__init__(message)
        self.param = param


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose root is exactly one of ``choices`` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_structured_output(so: StructuredOutput, param: str = "structured_output") -> None:
    """Raise GrammarError unless ``so`` compiles (tokenizer-independent; milliseconds)."""
    import xgrammar as xgr

    try:
        if so.kind == "json":
            xgr.Grammar.from_json_schema(so.spec, any_whitespace=False)
        elif so.kind == "regex":
            xgr.Grammar.from_regex(so.spec)
        elif so.kind in ("grammar", "choice"):
            xgr.Grammar.from_ebnf(_ebnf(so))
        elif so.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(so.spec)
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises several types for bad input
        raise GrammarError(f"Invalid {_WHAT[so.kind]}: {_one_line(e)}", param) from None


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
         "grammar": "EBNF grammar", "choice": "choice list", "structural_tag": "structural tag"}


def _ebnf(so: StructuredOutput) -> str:
    if so.kind == "grammar":
        return so.spec
    try:
        choices = json.loads(so.spec)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("A choice constraint needs a non-empty list of non-empty strings.")
    return choice_grammar(choices)


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer; xgrammar caches compiled grammars by their
    input, so a schema sent again costs a lookup. Thread-safe; xgrammar and the tokenizer
    scan are loaded on first use (``warm_up`` does it ahead of time).

    ``stop_token_ids`` are the engine's EOS ids: a complete output may end with them only.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler: Any = None

    def warm_up(self) -> None:
        self._get()

    def _get(self) -> Any:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise GrammarError("Structured output needs a tokenizer, and this engine has none.")
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
            return self._compiler

    def compile(self, so: StructuredOutput) -> Any:
        """The xgrammar CompiledGrammar of ``so``; GrammarError for a constraint that cannot compile."""
        compiler = self._get()
        try:
            if so.kind == "json":
                return compiler.compile_json_schema(so.spec, any_whitespace=False)
            if so.kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if so.kind == "regex":
                return compiler.compile_regex(so.spec)
            if so.kind == "structural_tag":
                return compiler.compile_structural_tag(so.spec)
            return compiler.compile_grammar(_ebnf(so))
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"Invalid {_WHAT[so.kind]}: {_one_line(e)}") from None


class GrammarRows:
    """The grammar matchers of the batch rows that have one (rank 0 only: it samples).

    Invariants: ``matchers[row]`` exists exactly while that row's request is constrained; it
    has accepted every output token of the row that reached the host (in order), so its next
    mask allows exactly the tokens that keep the output a prefix of the grammar's language
    (only EOS once the output is complete). ``constrained[row]`` mirrors it as a flag array.
    """

    def __init__(self, compiler: GrammarCompiler, max_rows: int, device: torch.device) -> None:
        self.compiler = compiler
        self.device = device
        self.matchers: dict[int, Any] = {}
        self.constrained = np.zeros(max_rows, dtype=bool)
        self._batch: Any = None

    def add(self, row: int, so: StructuredOutput, output_ids: list[int]) -> None:
        """A constrained request takes ``row``; a resumed one replays its outputs so far."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compiler.compile(so), override_stop_tokens=self.compiler.stop_token_ids
                                     or None)
        for token in output_ids:
            if not matcher.accept_token(token):
                break  # past the end (an ignored EOS): the mask then allows only EOS
        self.matchers[row] = matcher
        self.constrained[row] = True

    def remove(self, row: int) -> None:
        if self.matchers.pop(row, None) is not None:
            self.constrained[row] = False

    def any(self, rows: np.ndarray) -> bool:
        return bool(self.matchers) and bool(self.constrained[rows].any())

    def _stop_only_mask(self) -> torch.Tensor:
        """A bitmask row allowing the stop tokens only."""
        bits = np.zeros(cdiv(self.compiler.vocab_size, 32) * 32, dtype=bool)
        bits[self.compiler.stop_token_ids] = True
        words = np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view(np.int32)
        return torch.from_numpy(words.reshape(-1).copy())

    def accept(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Advance the matchers of ``rows`` (host rows of one collected step) by their tokens."""
        if not self.matchers:
            return
        for i in np.flatnonzero(self.constrained[rows]).tolist():
            matcher = self.matchers[int(rows[i])]
            # A token after the output ended (one step ahead runs one step past an EOS) is refused: harmless.
            if not matcher.is_terminated():
                matcher.accept_token(int(token_ids[i]))

    def bitmask(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions into ``rows``, int32 bitmask [P, ceil(V / 32)]) on the device for the
        constrained rows, filled from their matchers' current state; None when none is."""
        import xgrammar as xgr

        positions = np.flatnonzero(self.constrained[rows])
        if not len(positions):
            return None
        matchers = [self.matchers[int(rows[i])] for i in positions.tolist()]
        mask = xgr.allocate_token_bitmask(len(matchers), self.compiler.vocab_size)
        # A complete output (its matcher took an EOS, and the step one ahead samples again) may
        # only repeat EOS: xgrammar fills no mask for a terminated matcher.
        done = [i for i, m in enumerate(matchers) if m.is_terminated()]
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()] if done else None
        if done:
            mask[done] = self._stop_only_mask()
        if live is None and len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(mask, 0)
        elif live is None or live:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
            self._batch.batch_fill_next_token_bitmask(
                matchers if live is None else [matchers[i] for i in live], mask, live)
        on_device = self.device.type == "cuda"
        index = torch.from_numpy(positions.astype(np.int64))
        if on_device:
            return (index.pin_memory().to(self.device, non_blocking=True),
                    mask.pin_memory().to(self.device, non_blocking=True))
        return index, mask
