"""Text that can reach a tokenizer: Python strings that are valid Unicode.

Python decodes command-line arguments and file names with `surrogateescape`, so `$'hi \\xff'`
arrives as the string 'hi \\udcff'; JSON's "\\ud800" escape yields a lone surrogate too. Neither
encodes as UTF-8, and the tokenizers library fails on them with a TypeError deep inside a run.
Every text path checks them first (`check_text`, `decode_lines`) and says where the bad character
is: the argument, the file and line, or the text's index in an API call.
"""

from __future__ import annotations

from collections.abc import Iterator

from edge_slm.core.errors import EdgeSlmError


def unicode_problem(text: str) -> str | None:
    """None if `text` encodes as UTF-8, else what its first bad character is and where."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for one undecodable byte
            return f"byte 0x{code - 0xDC00:02x} at character {exc.start + 1} is not valid UTF-8"
        return f"character {exc.start + 1} is a lone surrogate (U+{code:04X}), not text"


def check_text(text: str, where: str, error: type[Exception] = EdgeSlmError) -> str:
    """`text` unchanged, or `error` naming `where` (e.g. "PROMPT (argument 2)", "text 3")."""
    problem = unicode_problem(text)
    if problem:
        raise error(f"{where}: {problem}; pass UTF-8 text")
    return text


def decode_lines(data: bytes) -> Iterator[tuple[int, str]]:
    """(line number, line) of UTF-8 `data`, numbered as an editor numbers them (only \\n ends a
    line; `str.splitlines` would also split at U+2028 and other separators). A leading BOM is
    dropped. Undecodable bytes stay as surrogates for `check_text` to report with the line."""
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")
