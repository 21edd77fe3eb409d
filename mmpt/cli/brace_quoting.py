"""Quote shell-style brace patterns in override values, so `data.train.urls='/d/{00000..00331}.tar'` works as
typed in bash: the shell strips the quotes and Hydra's override grammar reads a bare `{` as the start of a dict
(`mismatched input '{'`). A value part holding a brace pattern (`{a..b}` range or `{x,y}` list, no `:`) is
wrapped in quotes; what Hydra must still parse keeps its meaning: dicts `{k: v}`, lists `[a,b]`, sweeps `a,b`
(each part quoted on its own), sweep functions `choice(...)`, interpolations `${...}` and quoted strings."""
from __future__ import annotations

import re

_OPEN, _CLOSE = "([{", ")]}"
_PATTERN_GROUP = re.compile(r"(?<!\$)\{([^{}:]*)\}")  # a {...} group that is no ${...} interpolation, no dict
_RANGE = re.compile(r"\s*-?\w+\.\.-?\w+(\.\.-?\d+)?\s*")
_CALL = re.compile(r"(\w+)\((.*)\)", re.S)
_NAMED_ARG = re.compile(r"(\s*\w+\s*=)(.*)", re.S)


def quote_brace_override(arg: str) -> str:
    """`key=/d/{0..9}.tar` -> `key='/d/{0..9}.tar'`; anything without a brace pattern comes back unchanged."""
    key, eq, value = arg.partition("=")
    if not eq or "{" not in value:
        return arg
    return f"{key}={_quote_value(value)}"


def has_brace_pattern(text: str) -> bool:
    """A `{a..b}` range or `{x,y,...}` list that braceexpand (and WebDataset) would expand, outside `${...}`."""
    plain = _without_interpolations(text)
    return any(_RANGE.fullmatch(m.group(1)) or "," in m.group(1) for m in _PATTERN_GROUP.finditer(plain))


def _without_interpolations(text: str) -> str:
    """`text` minus its `${...}` spans (nested braces included): a resolver's arguments are no path pattern."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if depth:
            depth += text[i] == "{"
            depth -= text[i] == "}"
        else:
            out.append(text[i])
        i += 1
    return "".join(out)


def split_top_level(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _quote_value(value: str) -> str:
    """A whole value: a sweep's comma-separated parts are handled one by one."""
    return ",".join(_quote_part(part) for part in split_top_level(value, ","))


def _quote_part(part: str) -> str:
    text = part.strip()
    if not text or text[0] in "'\"":
        return part
    lead, trail = part[: len(part) - len(part.lstrip())], part[len(part.rstrip()):]
    if text[0] == "[" and text[-1] == "]":
        inner = text[1:-1]
    elif text[0] == "{" and text[-1] == "}" and _is_dict(text[1:-1]):
        items = [_quote_dict_item(item) for item in split_top_level(text[1:-1], ",")]
        return f"{lead}{{{','.join(items)}}}{trail}"
    elif (call := _CALL.fullmatch(text)) is not None:
        args = [_quote_call_arg(a) for a in split_top_level(call.group(2), ",")]
        return f"{lead}{call.group(1)}({','.join(args)}){trail}"
    else:
        return f"{lead}{_quoted(text)}{trail}" if has_brace_pattern(text) else part
    return f"{lead}[{_quote_value(inner)}]{trail}"


def _is_dict(inner: str) -> bool:
    """Hydra's dict: empty, or every item `key: value`."""
    items = split_top_level(inner, ",")
    return not inner.strip() or all(len(split_top_level(item, ":")) > 1 for item in items)


def _quote_dict_item(item: str) -> str:
    key, *rest = split_top_level(item, ":")
    return f"{key}:{_quote_part(':'.join(rest))}" if rest else item


def _quote_call_arg(arg: str) -> str:
    named = _NAMED_ARG.fullmatch(arg)
    return f"{named.group(1)}{_quote_part(named.group(2))}" if named else _quote_part(arg)


def _quoted(text: str) -> str:
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "'" + text.replace("'", "\\'") + "'"
