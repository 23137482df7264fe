"""Reading a user's YAML (search configs, hardware profiles) without trusting it.

``yaml.safe_load`` builds no arbitrary objects, but it still lets a 1 KB file whose aliases
nest (``b: [*a, *a, ...]``, ``c: [*b, *b, ...]``) stand for gigabytes once anything walks it, and
it silently keeps the last of two equal keys (``seed: 1`` ... ``seed: 2``). This loader refuses
both up front, with the line, so that a config error never hangs or runs the wrong setting.

It also reads numbers as YAML 1.2 does: ``1e-3`` is a number (YAML 1.1, and so PyYAML, reads
it as text) and ``2:4`` is text (YAML 1.1 reads it as the base-60 number 124), so that the
strict config models can refuse numbers written as quoted text without refusing ``lr: 1e-3``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from autosparse.config.validation import ConfigError

# nodes that aliases may add to a document beyond those written out: a config is some hundred
# nodes; anchors that share a choice list between rules stay far below this
MAX_ALIAS_NODES = 10_000

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"

# YAML 1.2 core schema numbers (plus 1.1's 0o/0x/0b, '_' separators and .inf/.nan spellings)
_INT_RE = re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0o?[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X)
_FLOAT_RE = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers and no duplicate keys (aliases are checked after
    composing, before anything is built)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue  # '<<: *base' merges; a key written beside it overrides, as YAML says
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeConstructor names it below
            if first is not None:
                raise ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first + 1}); "
                    "give each field once", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _numbers_as_yaml_12(loader: type[yaml.SafeLoader]) -> None:
    """Replace the YAML 1.1 int and float resolvers of ``loader`` by YAML 1.2's."""
    resolvers = {first: [(tag, regexp) for tag, regexp in entries if tag not in (_INT, _FLOAT)]
                 for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    loader.yaml_implicit_resolvers = resolvers
    loader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
    loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


_numbers_as_yaml_12(_Loader)


def _expanded_size(root: Node) -> tuple[int, int]:
    """(nodes written, nodes once every alias is expanded), without expanding anything: each
    node's expanded size is counted once and reused wherever an alias repeats it."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in children)
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError("an alias refers to a node that contains it (a recursive "
                              "structure)")
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise ConfigError(f"the alias at line {child.start_mark.line + 1} refers to a "
                                  "node that contains it (a recursive structure)")
            if id(child) not in size:
                stack.append((child, False))
    return len(size), size[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def parse_yaml(text: str, what: str, source: str) -> Any:
    """YAML text -> Python data, or a ConfigError naming ``what source`` and the line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            written, expanded = _expanded_size(node)
        except ConfigError as err:
            raise ConfigError(f"{what} {source}: {err}; write the values out") from None
        if expanded - written > MAX_ALIAS_NODES:
            raise ConfigError(
                f"{what} {source}: its aliases (*name) expand to {expanded:,} YAML nodes, "
                f"more than the {MAX_ALIAS_NODES:,} they may add (written out: {written:,}); "
                "write the values out or use fewer aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{what} {source} is not valid YAML{at}: "
                          f"{getattr(err, 'problem', None) or err}") from None
    except RecursionError:
        raise ConfigError(f"{what} {source} nests lists or mappings too deeply to read") \
            from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file -> Python data; an unreadable, non-UTF-8 or hostile file is a ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a UTF-8 text file (YAML is text)") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror or err}") from None
    return parse_yaml(text, what, str(path))
