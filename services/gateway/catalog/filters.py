"""Product attributes and the attribute filter: validation, a strict parser, and the SQL it becomes.

A product's attributes are key/value labels where a key may repeat (``color = red``, ``color = blue``), as
Google Vision Product Search's ``product_labels``. They are stored as a jsonb object mapping each key to the
sorted array of its distinct values (``{"brand": ["acme"], "color": ["blue", "red"]}``) under a GIN
``jsonb_path_ops`` index, so one term ``key = value`` is the containment test ``attributes @> '{"key": ["value"]}'``.

The filter grammar follows Google's ``ProductSearchParams.filter`` ("an AND of OR of key-value expressions,
where each expression within an OR must have the same key"; ``=`` connects key and value, ``color: red`` is
not accepted)::

    filter := <empty> | group ( "AND" group )* | term ( "OR" term )*
    group  := term | "(" term ( "OR" term )* ")"
    term   := word "=" word
    word   := bare | quoted

Where we follow Google:
  * ``(color = red OR color = blue) AND brand = acme`` and ``color = blue OR color = black`` (Google's own
    examples); spaces around ``=`` are optional (Google's docs show both ``key=value`` and ``key = value``).
  * All the terms of one OR must share a key; ``(color = red OR brand = acme)`` is refused.
  * Only ``=``: any other operator (``:``, ``!=``, ``<``, ``~`` ...) is refused by name.
  * Keys and values are non-empty and at most 128 long (Google: 128 bytes), at most 500 labels per product.

Where Google's documentation is silent and we chose, or where we are stricter:
  * Keys and values are case-sensitive and matched exactly (after trimming): ``Color`` and ``color`` are two
    keys. Google does not document case; exact matching is what jsonb containment does and is predictable.
  * ``AND`` and ``OR`` are upper case only (as in all of Google's examples); ``and``/``or`` are refused with
    a hint rather than read as values. A key or value spelled ``AND`` or ``OR`` must be quoted.
  * ``AND`` and an OR outside parentheses never mix: ``a = x OR a = y AND b = z`` is refused (it reads
    differently to SQL users and to "AND of ORs"); write ``(a = x OR a = y) AND b = z``. Parentheses hold
    exactly one OR group: no nesting, no ``AND`` inside, no empty ``()``.
  * Bare words are letters, digits, combining marks and ``_ - . + / @ # & % $``; anything else needs
    double quotes: ``color = "navy blue"``. Inside quotes, ``\\"`` and ``\\\\`` are the only escapes. Single
    quotes are not quotes here and are refused with a hint. Google documents no quoting at all.
  * Quoted keys and values are trimmed like stored attributes, so ``" red "`` matches ``red``; non-printable
    characters (``str.isprintable``: controls, NUL, non-ASCII spaces) are refused in attributes and filters.
  * Tokens are separated by space, tab, newline or carriage return only.
  * Lengths are counted in characters, not UTF-8 bytes. A filter is limited in length (4096 characters) and
    in terms (100); Google states no such limits.

Sources: the ``ProductSearchParams.filter`` and ``Product.KeyValue`` / ``product_labels`` API reference, and
the "Searching for Products" guide (cloud.google.com/vision/product-search/docs/searching).

Errors are :class:`InvalidInput` with reason ``bad_attributes`` or ``bad_filter``. Filter errors name the
character offset (counted from 0, as a Python string index) and quote the filter, e.g.
``filter: expected "=" after key 'color' at character 7: (color red)``.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

from psycopg import sql
from psycopg.types.json import Jsonb

from services.common.errors import InvalidInput

Term = tuple[str, str]
Group = tuple[Term, ...]

# Characters a bare (unquoted) word may hold besides letters, digits and combining marks.
_BARE_PUNCTUATION = frozenset("_-.+/@#&%$")
# Runs of these are read as one operator, so "!=" or ":" after a key is reported as an unknown operator.
_OPERATOR_CHARS = frozenset("=!<>:~")
_KEYWORDS = ("AND", "OR")
# Only these separate tokens; other white space (no-break spaces, U+001C...) is refused as non-printable.
_SEPARATORS = frozenset(" \t\n\r")
# Longer filters are quoted in error messages as a window around the error.
_QUOTE_WHOLE_UP_TO = 160
_QUOTE_WINDOW = 60


@dataclass(frozen=True)
class AttributeLimits:
    """Limits on one product's attributes and on one filter. Lengths are in characters."""

    max_keys: int = 64
    max_values: int = 500
    max_chars: int = 128
    max_filter_terms: int = 100
    max_filter_chars: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_keys", "max_values", "max_chars", "max_filter_terms", "max_filter_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"AttributeLimits.{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class Filter:
    """A filter in conjunctive normal form: every group must hold; a group holds when any of its terms does.

    All terms of a group share one key and no group is empty (as :func:`parse_filter` builds them).
    No groups means no restriction.
    """

    groups: tuple[Group, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.groups)

    def matches(self, attributes: Mapping[str, Iterable[str]]) -> bool:
        """Whether a product with these attributes (key -> values) passes, as the SQL of :func:`filter_sql`."""
        return all(any(value in attributes.get(key, ()) for key, value in group) for group in self.groups)


def _bad_attributes(message: str) -> InvalidInput:
    return InvalidInput(message, reason="bad_attributes")


def _check_text(text: str, what: str, limits: AttributeLimits) -> tuple[str, str] | None:
    """What is wrong with a trimmed key or value, and the limit it breaks, or None."""
    if not text:
        return f"the {what} is empty", ""
    if len(text) > limits.max_chars:
        return f"the {what} is {len(text)} characters", f"the limit is {limits.max_chars}"
    for char in text:
        if not char.isprintable():
            return f"the {what} holds the non-printable character U+{ord(char):04X}", ""
    return None


def _said(problem: tuple[str, str]) -> str:
    return f"{problem[0]}; {problem[1]}" if problem[1] else problem[0]


def normalise_attributes(pairs: Iterable[tuple[str, str]], limits: AttributeLimits) -> dict[str, list[str]]:
    """Validate key/value pairs and fold them into ``{key: sorted distinct values}``, ready for jsonb.

    Surrounding whitespace is trimmed; repeated pairs count once. Keys and values are case-sensitive.
    Raises InvalidInput (reason ``bad_attributes``) naming the attribute (1-based, in request order).
    """
    values_by_key: dict[str, set[str]] = {}
    total = 0
    for number, (raw_key, raw_value) in enumerate(pairs, start=1):
        key, value = raw_key.strip(), raw_value.strip()
        problem = _check_text(key, "key", limits)
        if problem:
            raise _bad_attributes(f"attribute {number}: {_said(problem)}")
        problem = _check_text(value, "value", limits)
        if problem:
            raise _bad_attributes(f"attribute {number} (key {key!r}): {_said(problem)}")
        values = values_by_key.get(key)
        if values is None:
            if len(values_by_key) == limits.max_keys:
                raise _bad_attributes(
                    f"attribute {number} (key {key!r}): more distinct keys than the limit of {limits.max_keys}")
            values = values_by_key[key] = set()
        if value not in values:
            if total == limits.max_values:
                raise _bad_attributes(
                    f"attribute {number} (key {key!r}): more distinct values in all than the limit of "
                    f"{limits.max_values}")
            values.add(value)
            total += 1
    return {key: sorted(values_by_key[key]) for key in sorted(values_by_key)}


class _Kind(Enum):
    WORD = "word"
    STRING = "quoted string"
    AND = '"AND"'
    OR = '"OR"'
    LPAREN = '"("'
    RPAREN = '")"'
    EQUALS = '"="'
    OPERATOR = "operator"
    END = "end of the filter"


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    text: str
    pos: int


def _quote(text: str, pos: int) -> str:
    if len(text) <= _QUOTE_WHOLE_UP_TO:
        return text
    start, end = max(0, pos - _QUOTE_WINDOW), min(len(text), pos + _QUOTE_WINDOW)
    return ("…" if start else "") + text[start:end] + ("…" if end < len(text) else "")


def _is_bare(char: str) -> bool:
    return unicodedata.category(char)[0] in "LNM" or char in _BARE_PUNCTUATION


class _Parser:
    """Tokenizer and recursive-descent parser over one filter text; raises InvalidInput at the first error."""

    def __init__(self, text: str, limits: AttributeLimits) -> None:
        self.text = text
        self.limits = limits
        # Tokens are read as the parser asks for them, so the first error in the text is the one reported.
        self.tokens = self._tokenize()
        self.lookahead: _Token | None = None
        self.terms = 0

    def error(self, what: str, pos: int, hint: str = "") -> InvalidInput:
        """``filter: <what> at character <pos> (<hint>): <the filter>``."""
        where = f"at character {pos}" + (f" ({hint})" if hint else "")
        return InvalidInput(f"filter: {what} {where}: {_quote(self.text, pos)}", reason="bad_filter")

    # Tokenizer.

    def _tokenize(self) -> Iterator[_Token]:
        text, i = self.text, 0
        singles = {"(": _Kind.LPAREN, ")": _Kind.RPAREN}
        while i < len(text):
            char = text[i]
            if char in _SEPARATORS:
                i += 1
            elif char in singles:
                yield _Token(singles[char], char, i)
                i += 1
            elif char == '"':
                token, i = self._string(i)
                yield token
            elif char in _OPERATOR_CHARS:
                end = i
                while end < len(text) and text[end] in _OPERATOR_CHARS:
                    end += 1
                op = text[i:end]
                yield _Token(_Kind.EQUALS if op == "=" else _Kind.OPERATOR, op, i)
                i = end
            elif _is_bare(char):
                end = i
                while end < len(text) and _is_bare(text[end]):
                    end += 1
                word = text[i:end]
                kind = _Kind.AND if word == "AND" else _Kind.OR if word == "OR" else _Kind.WORD
                yield _Token(kind, word, i)
                i = end
            elif char == "'":
                raise self.error("single quote", i, 'quote with "double quotes"')
            elif not char.isprintable():
                raise self.error(f"non-printable character U+{ord(char):04X}", i)
            else:
                raise self.error(f"unexpected character {char!r}", i, "put words that hold it in double quotes")
        while True:
            yield _Token(_Kind.END, "", len(text))

    def _string(self, start: int) -> tuple[_Token, int]:
        text, i = self.text, start + 1
        chars: list[str] = []
        while i < len(text):
            char = text[i]
            if char == '"':
                return _Token(_Kind.STRING, "".join(chars), start), i + 1
            if char == "\\":
                if i + 1 < len(text) and text[i + 1] in '"\\':
                    chars.append(text[i + 1])
                    i += 2
                    continue
                raise self.error("unknown escape in quoted string", i, 'the escapes are \\" and \\\\')
            if not char.isprintable():
                raise self.error(f"non-printable character U+{ord(char):04X} in quoted string", i)
            chars.append(char)
            i += 1
        raise self.error("unterminated quoted string", start, 'no closing "')

    # Parser.

    def peek(self) -> _Token:
        if self.lookahead is None:
            self.lookahead = next(self.tokens)
        return self.lookahead

    def advance(self) -> _Token:
        token = self.peek()
        self.lookahead = None
        return token

    def parse(self) -> Filter:
        if self.peek().kind is _Kind.END:
            return Filter()
        groups: list[Group] = []
        group, parenthesised = self.group()
        groups.append(group)
        bare_or = False
        while (token := self.advance()).kind is not _Kind.END:
            if token.kind is _Kind.AND:
                if bare_or:
                    raise self.error('"AND" after an OR outside parentheses', token.pos,
                                     'write "(a = x OR a = y) AND b = z"')
                group, parenthesised = self.group()
                groups.append(group)
            elif token.kind is _Kind.OR:
                if len(groups) > 1:
                    raise self.error('"OR" outside parentheses after "AND"', token.pos,
                                     'write "a = x AND (b = y OR b = z)"')
                if parenthesised:
                    raise self.error('"OR" after a closing ")"', token.pos,
                                     'put all the ORs of a group inside one "( )"')
                bare_or = True
                groups[0] = self.or_more(groups[0], token)
            else:
                self.unexpected(token, 'expected "AND", "OR" or the end of the filter after a value')
        return Filter(tuple(groups))

    def group(self) -> tuple[Group, bool]:
        """One AND operand: a single term, or an OR group in parentheses. Returns it and whether it had them."""
        token = self.peek()
        if token.kind is not _Kind.LPAREN:
            return (self.term("a key or \"(\""),), False
        self.advance()
        if self.peek().kind is _Kind.RPAREN:
            raise self.error('empty parentheses "()"', token.pos)
        if self.peek().kind is _Kind.LPAREN:
            raise self.error("nested parentheses", self.peek().pos, 'one "( )" holds the ORs of one key')
        group: Group = (self.term('a key after "("'),)
        while True:
            after = self.advance()
            if after.kind is _Kind.RPAREN:
                return group, True
            if after.kind is _Kind.OR:
                group = self.or_more(group, after)
            elif after.kind is _Kind.AND:
                raise self.error('"AND" inside parentheses', after.pos, 'write "(a = x OR a = y) AND b = z"')
            elif after.kind is _Kind.END:
                raise self.error('expected "OR" or ")"', after.pos, f'the "(" at character {token.pos} is not closed')
            else:
                self.unexpected(after, 'expected "OR" or ")" after a value')

    def or_more(self, group: Group, or_token: _Token) -> Group:
        """Append the term after an OR, which must have the group's key."""
        key_pos = self.peek().pos
        key, value = self.term('a key after "OR"')
        if key != group[0][0]:
            raise self.error(f"key {key!r} in an OR of key {group[0][0]!r}", key_pos,
                             "all the terms of an OR must share a key")
        return (*group, (key, value))

    def term(self, expected_key: str) -> Term:
        token = self.advance()
        if token.kind in (_Kind.AND, _Kind.OR):
            raise self.error(f"expected {expected_key}, not the keyword {token.text}", token.pos,
                             "quote a key spelled so")
        if token.kind not in (_Kind.WORD, _Kind.STRING):
            self.unexpected(token, f"expected {expected_key}")
        self.terms += 1
        if self.terms > self.limits.max_filter_terms:
            raise self.error(f"more than {self.limits.max_filter_terms} terms", token.pos,
                             f"the limit is {self.limits.max_filter_terms}")
        key = self.word(token, "key")
        equals = self.advance()
        if equals.kind is _Kind.OPERATOR:
            raise self.error(f"unknown operator {equals.text!r} after key {key!r}", equals.pos,
                             'the only operator is "="')
        if equals.kind is not _Kind.EQUALS:
            raise self.error(f'expected "=" after key {key!r}', equals.pos)
        value_token = self.advance()
        if value_token.kind in (_Kind.AND, _Kind.OR):
            raise self.error(f'expected a value after "=", not the keyword {value_token.text}', value_token.pos,
                             "quote a value spelled so")
        if value_token.kind not in (_Kind.WORD, _Kind.STRING):
            raise self.error(f'expected a value for key {key!r} after "="', value_token.pos)
        return key, self.word(value_token, "value")

    def word(self, token: _Token, what: str) -> str:
        """The trimmed text of a key or value token, checked as stored attributes are."""
        text = token.text.strip()
        problem = _check_text(text, what, self.limits)
        if problem:
            raise self.error(problem[0], token.pos, problem[1])
        return text

    def unexpected(self, token: _Token, expected: str) -> NoReturn:
        if token.kind is _Kind.RPAREN:
            raise self.error('unexpected ")" with no "(" to close', token.pos)
        if token.kind is _Kind.WORD and token.text.upper() in _KEYWORDS:
            raise self.error(f"{expected}, found {token.text!r}", token.pos, "AND and OR are upper case")
        raise self.error(expected, token.pos)


def parse_filter(text: str, limits: AttributeLimits) -> Filter:
    """Parse a filter such as ``(color = red OR color = blue) AND brand = acme`` (see the module docstring).

    Empty or blank text is the empty filter. Raises InvalidInput (reason ``bad_filter``) at the first error.
    """
    if len(text) > limits.max_filter_chars:
        raise InvalidInput(f"filter: {len(text)} characters; the limit is {limits.max_filter_chars}",
                           reason="bad_filter")
    if not text.strip():
        return Filter()
    return _Parser(text, limits).parse()


def filter_sql(f: Filter, column: sql.Composable = sql.Identifier("attributes")) -> tuple[sql.Composable, list[Jsonb]]:
    """The filter as an SQL boolean expression over a jsonb ``column``, with its parameters.

    Every term is ``column @> %s`` with a ``Jsonb({key: [value]})`` parameter, so the GIN ``jsonb_path_ops``
    index applies and no value reaches the SQL text. The placeholders are positional (``%s``): compose the
    expression into a query that uses positional parameters too. The empty filter is ``TRUE`` with no parameters.
    """
    if not f.groups:
        return sql.SQL("TRUE"), []
    contains = sql.SQL("{} @> {}").format(column, sql.Placeholder())
    clauses = [sql.SQL("({})").format(sql.SQL(" OR ").join([contains] * len(group))) for group in f.groups]
    params = [Jsonb({key: [value]}) for group in f.groups for key, value in group]
    return sql.SQL("({})").format(sql.SQL(" AND ").join(clauses)), params
