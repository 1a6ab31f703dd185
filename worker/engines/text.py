"""Text helpers for the cheap engines (echo, sim): whitespace tokens, a chat template, outputs."""

from __future__ import annotations

import heapq
import itertools
import zlib
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from worker.engines.base import Engine

T = TypeVar("T")

# The cheap engines' vocabulary size: word ids are a CRC of the word modulo this.
VOCAB = 32_000
# Used when a prompt has no words, so sim still has something to "generate".
FILLER_WORD = "lorem"


def count_words(text: str) -> int:
    """Whitespace tokens in `text`; a non-empty text counts at least 1."""
    if not text:
        return 0
    return max(1, len(text.split()))


def _content_text(content: Any) -> str:
    # OpenAI content may be a string or a list of parts; only text parts matter here.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def render_chat(messages: list[dict[str, Any]]) -> str:
    """Render messages as '<|role|>\\ncontent\\n' lines followed by the generation prompt."""
    lines = [f"<|{m.get('role', 'user')}|>\n{_content_text(m.get('content'))}\n" for m in messages]
    return "".join(lines) + "<|assistant|>\n"


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; return (text, whether it was cut)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    if cut < 0:
        return text, False
    return text[:cut], True


def echo_output(prompt: str, max_tokens: int, stop: Sequence[str] = ()) -> tuple[str, str, int]:
    """Echo the prompt's words, at most `max_tokens`: (text, finish_reason, completion tokens)."""
    words = prompt.split()
    finish = "length" if len(words) > max_tokens else "stop"
    text, cut = apply_stop(" ".join(words[:max_tokens]), stop)
    if cut:
        finish = "stop"
    return text, finish, len(text.split())


def sim_output(prompt: str, max_tokens: int, stop: Sequence[str] = ()) -> tuple[str, str, int]:
    """Exactly `max_tokens` words, the prompt's cycled (like ignore_eos), unless a stop cuts it.

    Returns (text, finish_reason, tokens generated); a stop string ends generation early but
    the sequence still generated at least one token.
    """
    words = prompt.split() or [FILLER_WORD]
    cycled = [words[i % len(words)] for i in range(max_tokens)]
    text, cut = apply_stop(" ".join(cycled), stop)
    if cut:
        return text, "stop", max(1, len(text.split()))
    return text, "length", max_tokens


def stream_pieces(text: str) -> list[str]:
    """A text cut into word-sized pieces that join back to exactly the text (streaming)."""
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])] if text else []


class WaitQueue(Generic[T]):
    """Waiting requests in admission order: lower priority value first, then FIFO."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int]] = []  # (priority, arrival, request id)
        self._items: dict[int, tuple[int, T]] = {}  # request id -> (arrival, item)
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._items

    def _live(self, entry: tuple[int, int, int]) -> bool:
        # Removed or re-queued ids leave stale heap entries behind (lazy deletion).
        found = self._items.get(entry[2])
        return found is not None and found[0] == entry[1]

    def push(self, request_id: int, priority: int, item: T) -> None:
        """Queue an item under its request id."""
        arrival = next(self._arrivals)
        self._items[request_id] = (arrival, item)
        heapq.heappush(self._heap, (priority, arrival, request_id))

    def peek(self) -> T | None:
        """The next item to admit, left in the queue."""
        while self._heap and not self._live(self._heap[0]):
            heapq.heappop(self._heap)
        return self._items[self._heap[0][2]][1] if self._heap else None

    def pop(self) -> T | None:
        """The next item to admit, or None when empty."""
        item = self.peek()
        if item is not None:
            _, _, request_id = heapq.heappop(self._heap)
            del self._items[request_id]
        return item

    def remove(self, request_id: int) -> T | None:
        """Take an item out of the queue; None if it is not waiting."""
        found = self._items.pop(request_id, None)
        return None if found is None else found[1]

    def in_order(self) -> list[T]:
        """All waiting items in admission order, left in the queue."""
        return [self._items[e[2]][1] for e in sorted(self._heap) if self._live(e)]


class WordTokenizer:
    """Whitespace 'tokens' and the '<|role|>' template: the cheap engines' tokenizer."""

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The plain '<|role|>' template."""
        return render_chat(messages)

    def encode(self, text: str) -> list[int]:
        """One id per whitespace-separated word, the same for the same word (a CRC of it)."""
        words = text.split() or ([text] if text else [])
        return [zlib.crc32(word.encode("utf-8", "surrogatepass")) % VOCAB for word in words]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text."""
        return [self.encode(text) for text in texts]


WORD_TOKENIZER = WordTokenizer()


class PlainTextEngine(Engine):
    """Base of the cheap engines: whitespace tokens and the '<|role|>' chat template."""

    @property
    def tokenizer(self) -> WordTokenizer:
        """Whitespace words."""
        return WORD_TOKENIZER
