"""YAML documents that remember where each value came from, so that a validator can name the
line of a bad field. Mappings load as `Located` dicts and sequences as `LocatedList`s; both
carry the line of themselves and of each of their entries. The `Fields` reader walks a mapping
the way every validator here needs it: required and optional fields, unknown keys refused.

`load_yaml` is the input boundary for YAML: whatever is wrong with the file (unreadable, not
UTF-8, a control character, not YAML, nested deeper than formats.limits.MAX_NESTING, an
unhashable key) becomes an InputError naming the file and, where known, the line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from formats.errors import InputError, decode_text
from formats.limits import MAX_NESTING

T = TypeVar("T")


class Located(dict):
    """A YAML mapping; `line` is its own line, `key_lines[k]` the line of key k (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class LocatedList(list):
    """A YAML sequence; `line` is its own line, `item_lines[i]` the line of item i."""

    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting past MAX_NESTING (PyYAML recurses once per level, so
    20,000 brackets were a RecursionError) with the line where it happens."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                raise InputError(f"nested more than {MAX_NESTING} levels deep",
                                 file=self.name, line=mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> Located:
    result = Located()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise InputError("a key must be a plain value, not a list or mapping",
                             file=loader.name, line=key_node.start_mark.line + 1) from None
        if key in result:
            raise InputError("duplicate key", file=loader.name,
                             line=key_node.start_mark.line + 1, field=str(key))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LocatedList:
    result = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(path: str | Path) -> Located:
    """Read a YAML file whose top level must be a mapping."""
    path = Path(path)
    text = decode_text(path)
    loader = None
    try:
        loader = _LineLoader(text)      # its reader refuses control characters right here
        loader.name = str(path)
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InputError(f"not valid YAML: {exc.problem}", file=path, line=line) from exc
    except yaml.reader.ReaderError as exc:
        # A character YAML does not allow (a control character): the reader knows its offset.
        line = text.count("\n", 0, exc.position) + 1
        code = ord(exc.character) if isinstance(exc.character, str) else exc.character
        raise InputError(f"not valid YAML: character 0x{code:02x} is not allowed (a control "
                         "character)", file=path, line=line) from exc
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {exc}", file=path) from exc
    except RecursionError as exc:   # a structure our depth check does not see (aliases)
        raise InputError("not valid YAML: nested too deeply", file=path) from exc
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(document, Located):
        raise InputError("the file must be a YAML mapping", file=path, line=1)
    return document


class Fields:
    """Reads the fields of one mapping, converting each and reporting file/line/field on error.

    `prefix` is the dotted path of the mapping itself (e.g. "hosts.edge1") so messages name
    the full field. Call `done()` at the end to refuse keys nobody asked for.
    """

    def __init__(self, mapping: Any, file: str | Path, prefix: str = "",
                 line: int | None = None) -> None:
        self.file = str(file)
        self.prefix = prefix
        if not isinstance(mapping, dict):
            raise InputError(f"expected a mapping, got {type(mapping).__name__}",
                             file=file, line=line, field=prefix or None)
        self.mapping = mapping
        self.line = getattr(mapping, "line", line)
        self._seen: set[Any] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def line_of(self, key: Any) -> int | None:
        return getattr(self.mapping, "key_lines", {}).get(key, self.line)

    def error(self, key: str, message: str) -> InputError:
        return InputError(message, file=self.file, line=self.line_of(key), field=self.path(key))

    def has(self, key: str) -> bool:
        return key in self.mapping

    def get(self, key: str, convert: Callable[[Any], T] | None = None,
            default: Any = ..., ) -> Any:
        """Value of `key`, passed through `convert` (a ValueError becomes an InputError).
        Without a default the field is required."""
        self._seen.add(key)
        if key not in self.mapping:
            if default is ...:
                raise InputError("required field is missing", file=self.file, line=self.line,
                                 field=self.path(key))
            return default
        value = self.mapping[key]
        if convert is None:
            return value
        try:
            return convert(value)
        except InputError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from exc

    def sub(self, key: str, default: Any = ...) -> Fields | None:
        """A nested mapping as its own Fields (None when optional and absent)."""
        value = self.get(key, default=default)
        if value is None:
            return None
        return Fields(value, self.file, self.path(key), line=self.line_of(key))

    def done(self) -> None:
        for key in self.mapping:
            if key not in self._seen:
                raise self.error(str(key), "unknown field")


def expect_type(kind: type | tuple[type, ...], what: str) -> Callable[[Any], Any]:
    """A converter that only checks the YAML type (e.g. a string, a list)."""

    def check(value: Any) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ValueError(f"expected {what}, got {value!r}")
        if not isinstance(value, kind):
            raise ValueError(f"expected {what}, got {value!r}")
        return value

    return check
