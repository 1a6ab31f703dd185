"""Prefix keys: a short per-line sort key that puts lines sharing a prompt prefix together.

The key is the chain of CRC-32s of the prompt text's leading 256 B, 512 B, 768 B, ... (one per
256-byte block, up to 64 KiB: at most 1 KiB of key, 1.6% of the text). Two lines whose texts
agree on their first k blocks agree on the key's first 4k bytes, so byte order of keys is trie
order at block granularity (siblings in hash order): a document, few-shot block or system
prompt shared by many lines makes them neighbours, also behind a longer shared prefix. vLLM
caches blocks of 16 tokens on GPU (about 64 bytes of English); a 256-byte block keeps the key
short and loses at most 4 such blocks where sharing ends. About 3 us for a 1 kB line. Raw
leading bytes as the key would cost the whole text and stop at their cut; levels at doubling
lengths (64 B, 128 B, ...) cannot tell apart documents behind a shared system prompt when both
end between two levels. A CRC collision (2^-32 per pair of sibling blocks) only interleaves
two groups.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from sluice.sampling import message_text

BLOCK_BYTES = 256
MAX_TEXT_BYTES = 64 * 1024
MAX_KEY_BYTES = 4 * (MAX_TEXT_BYTES // BLOCK_BYTES)


def prompt_text(prompt: str | None, messages: list[dict[str, Any]] | None) -> str:
    """What the model reads first, in order: the prompt, or each message's role and content.

    Cut at MAX_TEXT_BYTES characters (at least that many UTF-8 bytes): nothing past is keyed.
    """
    limit = MAX_TEXT_BYTES
    if messages is None:
        return (prompt or "")[:limit]
    parts: list[str] = []
    size = 0
    for m in messages:
        # The role too: a chat template writes it before the content.
        part = f"{m.get('role')}\n{message_text(m.get('content'))}\n"
        parts.append(part)
        size += len(part)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def prefix_key(text: str) -> bytes:
    """The sort key of a prompt text: 4 bytes per started 256-byte block (module docstring)."""
    data = text.encode("utf-8", "surrogatepass")[:MAX_TEXT_BYTES]
    crc = 0
    crcs = [
        crc := zlib.crc32(data[i : i + BLOCK_BYTES], crc) for i in range(0, len(data), BLOCK_BYTES)
    ]
    return _packer(len(crcs)).pack(*crcs)


_PACKERS: dict[int, struct.Struct] = {}


def _packer(count: int) -> struct.Struct:
    packer = _PACKERS.get(count)
    if packer is None:
        packer = _PACKERS[count] = struct.Struct(f">{count}I")
    return packer
