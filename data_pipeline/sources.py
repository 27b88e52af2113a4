"""Where documents come from. The demo corpus ships with every Python: the English help text of
the standard library's `pydoc_data.topics` (79 topics, ~465 KB)."""

from __future__ import annotations

from data_pipeline.shards import DataError


def demo_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def load_documents(source: str) -> list[str]:
    if source == "demo":
        return demo_documents()
    raise DataError(f"data.source={source!r} is not a known source (known: demo)")
