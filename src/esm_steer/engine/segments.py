"""Control points: where a response is cut into segments.

The response is split on ``control_points.segment_delimiter``. Control point m is the
boundary before segment m; m = 0 is the end of the prompt. Because "\\n\\n" is often merged
into other tokens (".\\n\\nThe"), boundaries are found on decoded text: control point m sits
right after the token whose text completes the m-th delimiter occurrence.

Mining (post hoc, on rollouts) and the online policy (step by step) both use
:class:`SegmentTracker`, so offline keys and online keys sit at the same places.
"""

from __future__ import annotations

from collections.abc import Sequence


class SegmentTracker:
    """Counts non-overlapping delimiter occurrences in text fed one token piece at a time.

    Left-to-right non-overlapping matching, the same as ``str.count``.
    """

    def __init__(self, delimiter: str):
        if not delimiter:
            raise ValueError("control_points.segment_delimiter must be a non-empty string")
        self.delimiter = delimiter
        self.text = ""
        self.count = 0
        self._scan_from = 0  # first index where a new occurrence may start

    def feed(self, piece: str) -> int:
        """Append a token's text; return how many delimiter occurrences it completed."""
        self.text += piece
        d, n = self.delimiter, len(self.delimiter)
        found = 0
        i = self.text.find(d, self._scan_from)
        while i != -1:
            found += 1
            self._scan_from = i + n
            i = self.text.find(d, self._scan_from)
        # no match pending: a later match can start no earlier than len(text) - n + 1
        self._scan_from = max(self._scan_from, len(self.text) - n + 1)
        self.count += found
        return found

    def copy(self) -> SegmentTracker:
        other = SegmentTracker(self.delimiter)
        other.text, other.count, other._scan_from = self.text, self.count, self._scan_from
        return other


def token_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token decoded alone (what a streaming decoder sees)."""
    return [tokenizer.decode([int(t)], skip_special_tokens=False) for t in token_ids]


def control_point_offsets(pieces: Sequence[str], delimiter: str, M: int) -> list[int]:
    """Response-token offsets b_0 = 0 < b_1 < ... of control points 0..M-1 that the response reaches.

    b_m is the number of response tokens before control point m; segment m is tokens
    [b_m, b_{m+1}) (the last one runs to the end of the response). A control point whose
    boundary is the very end of the response opens an empty segment and is not returned.
    """
    offsets = [0]
    if M <= 1:
        return offsets
    tracker = SegmentTracker(delimiter)
    for j, piece in enumerate(pieces):
        if tracker.feed(piece) and j + 1 < len(pieces):
            offsets.append(j + 1)
            if len(offsets) == M:
                break
    return offsets


def segment_spans(offsets: Sequence[int], length: int) -> list[tuple[int, int]]:
    """[start, end) of each segment given control-point offsets and the response length."""
    ends = list(offsets[1:]) + [length]
    return [(s, e) for s, e in zip(offsets, ends)]
