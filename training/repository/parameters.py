"""Set string parameters in a Triton ``config.pbtxt`` as text, leaving every other byte of it as it was.

Configs in the model repository carry hand-written comments and a layout that reviewers read in diffs, so a
parameter is changed by rewriting only its own one-line entry::

    parameters { key: "shopvision.thresholds" value: { string_value: "[0.61,0.98]" } }

(the form ``training.repository.layout`` writes), or, for a new key, by adding such a line after the last
top-level one (at the end of the file when there is none). Values are escaped for the protobuf text format, so
a JSON value with quotes or backslashes reads back exactly through ``google.protobuf.text_format`` (and
Triton's C++ parser, which shares the escape rules).
"""
from __future__ import annotations

import re

# One top-level parameters entry on a line of its own: `parameters { key: "k" value: { string_value: "..." } }`.
_ONE_LINE = re.compile(
    r'^(?P<indent>[ \t]*)parameters[ \t]*\{[ \t]*key:[ \t]*"(?P<key>(?:[^"\\]|\\.)*)"[ \t]+value:[ \t]*\{[ \t]*'
    r'string_value:[ \t]*"(?:[^"\\]|\\.)*"[ \t]*\}[ \t]*\}[ \t]*$')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def escape(value: str) -> str:
    """``value`` as the inside of a protobuf text-format string literal: backslash and double quote escaped (as
    ``layout.parameter_line`` does, so ``layout.parameter_of`` reads it back), control characters as octal
    escapes, everything else (UTF-8 included) as it is."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return _CONTROL.sub(lambda match: f"\\{ord(match.group()):03o}", escaped)


def parameter_line(key: str, value: str, indent: str = "") -> str:
    return f'{indent}parameters {{ key: "{escape(key)}" value: {{ string_value: "{escape(value)}" }} }}'


def set_parameters(text: str, params: dict[str, str]) -> str:
    """``text`` with each ``params`` key set to its value: its one-line entry replaced in place (a repeated entry
    keeps only the first), or a new line added after the last top-level parameters line (else at the end).

    Raises ``ValueError`` when a key is present in another form (a multi-line entry) that this cannot rewrite
    without a parser, rather than leave two entries behind."""
    lines = text.splitlines(keepends=True)
    escaped_keys = {escape(key): key for key in params}
    done: set[str] = set()
    out: list[str] = []
    last_parameter = -1
    for line in lines:
        body = line.rstrip("\r\n")
        match = _ONE_LINE.match(body)
        if match is None:
            out.append(line)
            continue
        key = escaped_keys.get(match["key"])
        if key is None:
            out.append(line)
        elif key not in done:
            out.append(parameter_line(key, params[key], match["indent"]) + line[len(body):])
            done.add(key)
        else:
            continue  # a second entry of the same key: the first one now holds the value
        if not match["indent"]:
            last_parameter = len(out) - 1
    rewritten = "".join(out)
    for key in params:
        if key not in done and re.search(r'key:\s*"' + re.escape(escape(key)) + '"', rewritten):
            raise ValueError(f"parameter {key!r} is in the config in a form other than one line "
                             '`parameters { key: ... value: { string_value: ... } }`: edit it by hand')
    added = [parameter_line(key, value) + "\n" for key, value in params.items() if key not in done]
    if not added:
        return rewritten
    if last_parameter >= 0:
        if not out[last_parameter].endswith("\n"):
            out[last_parameter] += "\n"
        out[last_parameter + 1:last_parameter + 1] = added
        return "".join(out)
    if rewritten and not rewritten.endswith("\n"):
        rewritten += "\n"
    return rewritten + "".join(added)
