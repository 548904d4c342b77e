"""The multi-turn search tool's text, as the model sees it (Search-R1's protocol): the call the model writes
(`<search>query</search>`), the tool's reply (numbered passages in an `<information>` block), the system prompt
that teaches both (configs/search.yaml gives it as system_prompt), and the parse of a call. The rollout's episodes
(rollout/tools.py) and the embedded search model's builder (tiny.py, which warms the model up on this very text)
both read it here, so the two never drift apart.

A shared leaf: imports nothing from tgrpo.
"""
from __future__ import annotations

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
SEARCH_SYSTEM = ("Look facts up with <search>query</search>; results come in <information></information>. "
                 "Answer inside <answer></answer>.")
EMPTY_QUERY = "(empty query: write <search>your query</search>)"


def format_information(passages: list[str]) -> str:
    """The tool's reply as the model sees it (Search-R1's layout): numbered passages in an information block."""
    docs = "\n".join(f"Doc {i}: {p.strip()}" for i, p in enumerate(passages, 1))
    return f"\n\n{INFO_OPEN}{docs}{INFO_CLOSE}\n\n"


def extract_query(text: str) -> str | None:
    """The query of the search call `text` ends with, or None if it does not end with one."""
    end = text.rfind(SEARCH_CLOSE)
    if end < 0 or text[end + len(SEARCH_CLOSE):].strip():
        return None
    start = text.rfind(SEARCH_OPEN, 0, end)
    return text[start + len(SEARCH_OPEN):end].strip() if start >= 0 else ""
