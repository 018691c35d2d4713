"""Incremental detokenization: yields text pieces that never split a multi-byte character, and
holds back text that may be the start of a stop string."""

from __future__ import annotations

from edge_slm.core.errors import EdgeSlmError

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers before 0.21
    DecodeStream = None


def stop_strings(stop) -> tuple[str, ...]:
    """`stop` as a tuple: one string is one stop string (not its characters), a list or tuple of
    strings each; anything else is refused in one line."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise EdgeSlmError(f"stop is {stop!r}; give a string or a list of strings")


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # all complete text decoded so far
        self.emitted = 0  # how much of self.text was handed out
        self._prefix = 0  # token offsets as in text-generation-inference's decoder
        self._read = 0
        self.stopped = False
        # tokenizers' own incremental decoder where the installed version has it (0.21 and newer);
        # the prefix/read offsets below otherwise.
        self._decoder = DecodeStream(skip_special_tokens=True) if DecodeStream is not None else None

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to show (maybe empty)."""
        self.ids.append(token_id)
        if self._decoder is not None:
            self.text += self._decoder.step(self.tokenizer, token_id) or ""
            self._read = len(self.ids)
            return self._release()
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        limit = len(self.text)
        if not self.stopped:  # keep back a tail that could still grow into a stop string
            for stop in self.stop:
                for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:n]):
                        limit = min(limit, len(self.text) - n)
                        break
        piece = self.text[self.emitted : limit] if limit > self.emitted else ""
        self.emitted = max(self.emitted, limit)
        return piece

    def flush(self) -> str:
        """At the end: whatever is held back (a partial stop string that never completed, or bytes
        that never became a whole character)."""
        if self._decoder is not None and not self.stopped:
            # Bytes the decoder still holds (a character cut off by the end): as decode() shows them.
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if full.startswith(self.text):
                self.text = full
        elif not self.stopped and self._read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
            self.text += after[len(before) :]
            self._prefix = self._read = len(self.ids)
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece
