"""Untrusted input: files and text (rules, strategies, student configs, JSON configs), bounded before any work.

Every reader here refuses, with one line naming the file or text: what is not a regular file once links are
resolved (opening a FIFO blocks until a writer comes), more bytes than a bound, text that is not UTF-8, YAML
anchors and aliases (a few kB of aliases expand into gigabytes as soon as the data is copied or serialised),
nesting deeper than any config needs, and integers too long to be a size or a seed.
"""
from __future__ import annotations

import json
import os
import re
import stat
from typing import Any, BinaryIO

import yaml

from ..errors import ProjectionError

MAX_TEXT_BYTES = 1 << 20  # rules, strategies, student configs, config.json: real ones are a few kB
MAX_DEPTH = 32  # YAML nesting (rules need 3)
MAX_NODES = 50_000  # YAML values (rules for every key of a Wan 14B student: under 5,000)
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; sizes, offsets and seeds are below it


class _Refused(ValueError):
    """Raised inside a parser; the caller adds the file or text it came from."""


# ---------------------------------------------------------------- files

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def require_regular(path: str | os.PathLike, what: str) -> None:
    """Refuse what is not a regular file after following links (for files a library opens itself)."""
    try:
        _check_mode(path, os.stat(path).st_mode)
    except OSError as exc:
        raise ProjectionError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def _check_mode(path: str | os.PathLike, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ProjectionError(f"{path}: not a regular file ({_kind(mode)}); refused")


def regular_fd(path: str | os.PathLike) -> int:
    """A descriptor for reading a regular file. It is opened non-blocking, so that a FIFO put in the file's
    place cannot hang the reader, and checked once open; OSError passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_mode(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """Open a regular file for reading, refused before opening if it is anything else."""
    require_regular(path, what)
    try:
        return os.fdopen(regular_fd(path), "rb")
    except OSError as exc:
        raise ProjectionError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def read_bytes(path: str | os.PathLike, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """A whole small file, refused before reading when larger than `limit`."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:  # the second: the file grew after the check
        raise ProjectionError(f"{path}: {what} of {max(size, len(data)):,} bytes; at most {limit:,} are accepted")
    return data


def read_text(path: str | os.PathLike, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file (rules, strategy, student config)."""
    return decode(read_bytes(path, what, limit), str(path))


def decode(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1  # the position only: never echo bytes of a file that may be secret
        raise ProjectionError(f"{origin}: not UTF-8 text (invalid byte at offset {exc.start}, line {line})") from None


def check_size(text: str, origin: str, limit: int = MAX_TEXT_BYTES) -> None:
    """Text from the app (an editor, a form) or a file already read: at most `limit` bytes as UTF-8."""
    size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ProjectionError(f"{origin}: {size:,} bytes of text; at most {limit:,} are accepted")


# ---------------------------------------------------------------- YAML

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 5x faster on a 1 MB paste


class BoundedLoader(_Loader):
    """A safe loader whose integers are at most MAX_INT_DIGITS long (load_yaml checks the structure first)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = node.value.lstrip("+-").replace("_", "")
        if len(digits) > MAX_INT_DIGITS:
            raise _Refused(f"an integer of {len(digits):,} digits on line {node.start_mark.line + 1} "
                           f"(at most {MAX_INT_DIGITS})")
        return super().construct_yaml_int(node)


    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """YAML keeps the last of two equal keys; a strategy or rules file that says a thing twice is refused."""
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise _Refused(f"key '{clip(key.value)}' appears twice in one mapping (line {key.start_mark.line + 1})"
                                   "; say each setting once")
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def _check_structure(text: str) -> None:
    """One pass over the parser's events, before anything is built: no anchor or alias (whatever it would
    expand to), at most MAX_DEPTH levels of nesting and MAX_NODES values."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.NodeEvent):
            if event.anchor is not None:
                sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
                raise _Refused(f"YAML anchors and aliases are not accepted ({sign}{clip(event.anchor)} on line "
                               f"{line}); write the value out")
            nodes += 1
            if nodes > MAX_NODES:
                raise _Refused(f"more than {MAX_NODES:,} YAML values (line {line})")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"YAML nested more than {MAX_DEPTH} levels deep (line {line})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_yaml(text: str, origin: str, limit: int = MAX_TEXT_BYTES) -> Any:
    """Parse untrusted YAML (plain data only) after checking its size and structure."""
    check_size(text, origin, limit)
    try:
        _check_structure(text)
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (a SafeLoader)
    except _Refused as exc:
        raise ProjectionError(f"{origin}: {exc}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a malformed number
        raise ProjectionError(f"{origin}: invalid YAML: {exc}") from exc


# ---------------------------------------------------------------- JSON

def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(digits.lstrip('-')):,} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


def load_json(data: bytes | str, origin: str) -> Any:
    """Parse untrusted JSON (the caller bounds its size): UTF-8, integers of at most 20 digits, nesting
    within the interpreter's recursion limit (no JSON this tool reads nests more than 3 levels)."""
    text = decode(data, origin) if isinstance(data, bytes) else data
    try:
        return json.loads(text, parse_int=_int)
    except _Refused as exc:
        raise ProjectionError(f"{origin}: {exc}") from None
    except RecursionError:
        raise ProjectionError(f"{origin}: JSON nested too deeply") from None
    except ValueError as exc:
        raise ProjectionError(f"{origin}: invalid JSON: {exc}") from exc


def read_json(path: str | os.PathLike, what: str, limit: int = MAX_TEXT_BYTES) -> Any:
    return load_json(read_bytes(path, what, limit), str(path))


def clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def printable(text: str) -> str:
    """Text from a file, safe to print or show on one line: control characters (ANSI escapes, BEL, CR/LF) become
    spaces, and runs of spaces one."""
    return " ".join(_CONTROL.sub(" ", text).split())

