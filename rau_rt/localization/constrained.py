"""Constrained box decoding with llguidance: the answer grammar and the per-step token mask.

The grammar (lark) accepts exactly the compact JSON the prompt asks for:

    [{"label":"<a requested name>","bbox_2d":[x1,y1,x2,y2]},...]   or "bbox_2d":null

in one of two forms (`ANSWER_FORMS`): "every" (the default) has one item per requested region
in the order asked, as the prompt requests ("null for a region that is not visible"), so every
answer is complete and the labels are forced, leaving the model only null-or-box and the
numbers; "any" allows up to as many items as regions asked, each with a requested label, in
any order, for a fine-tune that lists only the regions it finds.

Numbers are ASCII digits without leading zeros, bounded by the model's coordinate range (the
input's side for Qwen2.5-VL's absolute pixels, 1000 for Qwen2-VL), written as `[0-9]` classes
because llguidance's `\\d` also matches Unicode digits. No whitespace is allowed anywhere, and
the grammar ends at the closing bracket, so generation stops there without an end token
(notes/constrained_decoding.md: the matcher reports stopped as soon as `]` is consumed).
What the grammar forces (`"label":` after `{`, in the "every" form the name and `,"bbox_2d":`
after it, `]}` after the last number: about half of an item's tokens) is handed to the decoder
as one multi-token step.

llguidance is imported lazily: `import rau_rt` stays light, and a localizer without constraint
does not need it. `Guidance` builds the LLTokenizer once (0.9 s for a 123k vocabulary); a
matcher per answer costs about 1 ms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from rau_rt.errors import DecodingError, InputError


def number_pattern(limit: int) -> str:
    """A regex for the integers 0..limit in decimal, no leading zeros, ASCII `[0-9]` only."""
    if limit < 0:
        raise InputError(f"number_pattern: expected a limit >= 0, got {limit}")
    digits = str(limit)
    k = len(digits)
    if k == 1:
        return f"[0-{limit}]"
    alternatives = ["0", f"[1-9][0-9]{{0,{k - 2}}}"]
    for i in range(k):  # k-digit numbers that first fall below `limit` at digit i
        low, high = (1 if i == 0 else 0), int(digits[i]) - 1
        if high >= low:
            alternatives.append(f"{digits[:i]}[{low}-{high}]" + "[0-9]" * (k - i - 1))
    alternatives.append(digits)
    return "|".join(alternatives)


def _lark_literal(text: str) -> str:
    # a lark string literal whose content is `text` (quotes and backslashes escaped)
    return json.dumps(text, ensure_ascii=False)


ANSWER_FORMS = ("every", "any")


def box_grammar(names: Sequence[str], max_coordinate: int, form: str = "every") -> str:
    """The lark grammar of an answer for `names` in `form` (`ANSWER_FORMS`): every name once
    in order, or at most len(names) items with any of the names."""
    if not names:
        raise InputError("box_grammar: expected at least one region name")
    if form not in ANSWER_FORMS:
        raise InputError(f"box_grammar: form {form!r}, expected one of {ANSWER_FORMS}")
    literals = [_lark_literal(json.dumps(n, ensure_ascii=False)) for n in names]
    common = ['coords: "[" NUM "," NUM "," NUM "," NUM "]" | "null"',
              f"NUM: /{number_pattern(max_coordinate)}/"]
    item = '"{\\"label\\":" LABEL ",\\"bbox_2d\\":" coords "}"'
    if form == "every":
        return "\n".join([
            'start: "[" ' + ' "," '.join(f"item{i}" for i in range(len(names))) + ' "]"',
            *(f"item{i}: " + item.replace("LABEL", literal) for i, literal in enumerate(literals)),
            *common]) + "\n"
    items = "box"
    for _ in range(len(names) - 1):  # nested optionals bound the count: box ("," box (...)?)?
        items = f'box ("," {items})?'
    return "\n".join([f'start: "[" ({items})? "]"', "box: " + item.replace("LABEL", "label"),
                      *common, f"label: {' | '.join(literals)}"]) + "\n"


def max_answer_bytes(names: Sequence[str], max_coordinate: int) -> int:
    """Bytes of the longest answer `box_grammar` accepts.

    Every token the mask allows spells at least one byte, so this many decode steps always
    reach the closing bracket: it is the localizer's token bound for constrained answers.
    """
    longest = max((json.dumps(n, ensure_ascii=False) for n in names),
                  key=lambda s: len(s.encode()))
    item = ('{"label":' + longest + ',"bbox_2d":[' + ",".join([str(max_coordinate)] * 4)
            + "]}")
    return 2 + len(names) * len(item.encode()) + len(names) - 1


class Guidance:
    """llguidance's tokenizer for one bundle, built once; makes a matcher per answer.

    Args:
        tokenizer_json: the bundle's tokenizer.json text.
        vocab_size: the decoder's logits width (Qwen pads it past the tokenizer's size; the
            padding ids are never allowed).
        eos_ids: ids that end a turn (`<|im_end|>`).
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]) -> None:
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=list(eos_ids))

    def compile(self, grammar: str) -> str:
        """Lark text -> llguidance grammar, checked (InputError naming the problem)."""
        compiled = self._llg.LLMatcher.grammar_from_lark(grammar)
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(
            compiled, self.tokenizer)
        if is_error:
            raise InputError(f"answer grammar rejected by llguidance: {messages}")
        return compiled

    def matcher(self, compiled: str) -> BoxConstraint:
        """A fresh constraint for one answer."""
        return BoxConstraint(self._llg.LLMatcher(self.tokenizer, compiled, log_level=0),
                             self.vocab_size)


class BoxConstraint:
    """`rau_rt.vlm_decoding.Constraint` over an llguidance matcher."""

    def __init__(self, matcher, vocab_size: int) -> None:
        import llguidance.numpy as llg_numpy

        if matcher.is_error():
            raise DecodingError(f"llguidance matcher failed: {matcher.get_error()}")
        self._matcher = matcher
        self._fill = llg_numpy.fill_next_token_bitmask
        self._bitmask = llg_numpy.allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next."""
        self._fill(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")
        return bits[:self._vocab].astype(bool)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise DecodingError(f"token {token} was allowed by the mask but rejected by the "
                                f"grammar: {self._matcher.get_error()}")

    def forced(self) -> list[int]:
        """The tokens the grammar forces next (e.g. `"bbox_2d":` after `{`), consumed."""
        tokens = list(self._matcher.compute_ff_tokens())
        if tokens and not self._matcher.consume_tokens(tokens):
            raise DecodingError(f"forced tokens {tokens} rejected by the grammar: "
                                f"{self._matcher.get_error()}")
        return tokens

    def is_stopped(self) -> bool:
        return bool(self._matcher.is_stopped())
