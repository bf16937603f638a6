"""jsonl records of the fine-tuning formats (prepare format=chat|classify), each with the file
and line that error messages name."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from framework.data.shards import DataError


def jsonl_records(
    lines: Iterable[tuple[str, int, str]], error: type[DataError]
) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) of every non-blank line of (file, line number, line text); a line
    that is not JSON raises `error` naming its file and line."""
    for url, line_no, line in lines:
        if not line.strip():
            continue
        where = f"{url} line {line_no}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not JSON ({e})") from e
