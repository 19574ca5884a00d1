"""A renderer for the subset of Go's text/template that ftcli's Ollama Modelfiles use, and Ollama's way of filling
a template from a chat, so that `ftcli export --check` and the tests check the Modelfiles without Ollama or Go.

Supported: text; actions with trim markers (`{{- ` and ` -}}`); `range PIPELINE` and `range $i, $m := PIPELINE`
over a list; `if` / `else if` / `else` / `end`; a pipeline of one command: a function (eq, ne, lt, le, gt, ge, and,
or, not, len) with its arguments, or one operand: `.Field`, `$.Field`, `$var`, `$var.Field`, a "string" or an
integer, or a parenthesised command. Values follow Go's rules: truth (false, 0, "" and empty lists are false), and
and or returning an argument, eq refusing to compare a string with a number. Everything else (pipes, with,
template, define, comments, assignments, range-else, unknown fields) raises UnsupportedTemplate: a check must fail
rather than pass on a rendering Go would not produce.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Optional

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<number>-?\d+)|(?P<paren>[()])|(?P<declare>:=)'
                    r'|(?P<comma>,)|(?P<word>\$?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|\$(?:\.[A-Za-z_]\w*)*|'
                    r'(?:\.[A-Za-z_]\w*)+|\.)|(?P<other>\S))')
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}
_WHITESPACE = " \t\r\n"


class UnsupportedTemplate(Exception):
    """A construct this renderer does not implement, or one Go would reject."""


@dataclass
class Message:
    """What a template sees of one chat message in Ollama (api.Message): .Role and .Content."""

    Role: str
    Content: str


@dataclass
class _Node:
    kind: str  # text, output, if, range
    text: str = ""
    command: list = field(default_factory=list)
    branches: list = field(default_factory=list)  # if: [(command, body)], an else body has command None
    variables: list = field(default_factory=list)  # range: the $index and $element names
    body: list = field(default_factory=list)


def render(template: str, data: dict) -> str:
    """`template` executed on `data` (a dict of Ollama's template values) as Go's text/template would."""
    nodes, _ = _parse(_segments(template), 0, top=True)
    return _execute(nodes, data, {"$": data})


def ollama_prompt(template: str, system: Optional[str], messages: list[dict], system_in_messages: bool = True) -> str:
    """The prompt Ollama builds from a Modelfile's TEMPLATE and SYSTEM for a chat (ChatHandler, template.Execute and
    collate): SYSTEM is added first unless the chat opens with a system message, consecutive messages of one role
    are joined with a blank line, and $.System is every system message's content. Older Ollama versions also
    dropped the system messages from .Messages (`system_in_messages` False)."""
    if system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    collated: list[Message] = []
    for message in messages:
        if message["role"] == "system" and not system_in_messages:
            continue
        if collated and collated[-1].Role == message["role"]:
            collated[-1].Content += "\n\n" + message["content"]
        else:
            collated.append(Message(message["role"], message["content"]))
    systems = [message["content"] for message in messages if message["role"] == "system"]
    return render(template, {"System": "\n\n".join(systems), "Messages": collated})


def _segments(template: str) -> list[tuple[str, str]]:
    """("text", TEXT) and ("action", BODY) in order, with the trim markers applied to the text beside them."""
    segments: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        body = match.group(1)
        if trim_next:
            text = text.lstrip(_WHITESPACE)
        if body.startswith("-") and body[1:2] in tuple(_WHITESPACE):
            text, body = text.rstrip(_WHITESPACE), body[2:]
        trim_next = body.endswith("-") and body[-2:-1] in tuple(_WHITESPACE)
        if trim_next:
            body = body[:-2]
        segments += [("text", text), ("action", body.strip())]
        position = match.end()
    rest = template[position:]
    if "{{" in rest or "}}" in rest:
        raise UnsupportedTemplate(f"unbalanced delimiters in {rest!r}")
    segments.append(("text", rest.lstrip(_WHITESPACE) if trim_next else rest))
    return segments


def _parse(segments: list, index: int, top: bool = False) -> tuple[list[_Node], int]:
    """Nodes from `segments[index]` up to the `else`/`end` that closes the block (its index is returned)."""
    nodes: list[_Node] = []
    while index < len(segments):
        kind, body = segments[index]
        if kind == "text":
            if body:
                nodes.append(_Node("text", text=body))
            index += 1
            continue
        tokens = _tokens(body)
        keyword = tokens[0][1] if tokens and tokens[0][0] == "word" else None
        if keyword in ("else", "end"):
            if top:
                raise UnsupportedTemplate(f"{{{{ {body} }}}} without an open if or range")
            return nodes, index
        if keyword == "if":
            node, index = _parse_if(segments, index, tokens[1:])
        elif keyword == "range":
            node, index = _parse_range(segments, index, tokens[1:])
        elif keyword in ("with", "template", "define", "block", "break", "continue", "nil"):
            raise UnsupportedTemplate(f"{keyword} is not supported: {{{{ {body} }}}}")
        else:
            node, index = _Node("output", command=_command(tokens, body)), index + 1
        nodes.append(node)
    if not top:
        raise UnsupportedTemplate("an if or range has no end")
    return nodes, index


def _parse_if(segments: list, index: int, condition: list) -> tuple[_Node, int]:
    node = _Node("if")
    command: Optional[list] = _command(condition, "if")
    while True:
        body, index = _parse(segments, index + 1)
        node.branches.append((command, body))
        tokens = _tokens(segments[index][1])
        if tokens[0][1] == "end":
            _expect_alone(tokens, "end")
            return node, index + 1
        if command is None:
            raise UnsupportedTemplate("an if has a branch after its else")
        if len(tokens) > 1 and tokens[1][1] == "if":
            command = _command(tokens[2:], "else if")
        else:
            _expect_alone(tokens, "else")
            command = None


def _parse_range(segments: list, index: int, tokens: list) -> tuple[_Node, int]:
    variables: list[str] = []
    if any(kind == "declare" for kind, _ in tokens):
        while tokens[0][0] != "declare":
            kind, value = tokens.pop(0)
            if kind == "word" and value.startswith("$") and "." not in value:
                variables.append(value)
            elif kind != "comma":
                raise UnsupportedTemplate(f"range declares {value!r}")
        tokens.pop(0)
        if not 1 <= len(variables) <= 2:
            raise UnsupportedTemplate(f"range declares {len(variables)} variables")
    node = _Node("range", command=_command(tokens, "range"), variables=variables)
    node.body, index = _parse(segments, index + 1)
    closing = _tokens(segments[index][1])
    if closing[0][1] != "end":
        raise UnsupportedTemplate("range with an else branch is not supported")
    _expect_alone(closing, "end")
    return node, index + 1


def _expect_alone(tokens: list, keyword: str) -> None:
    if len(tokens) != 1:
        raise UnsupportedTemplate(f"{keyword} takes no arguments here")


def _tokens(body: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(body.rstrip()):
        match = _TOKEN.match(body, position)
        if match is None or match.lastgroup == "other":
            raise UnsupportedTemplate(f"cannot read {body[position:].strip()!r} in {{{{ {body} }}}}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    if not tokens:
        raise UnsupportedTemplate("an empty action")
    return tokens


def _command(tokens: list, where: str) -> list:
    """A command as a list of arguments, each ("call", name, args), ("field", chain), ("literal", value) or a
    nested command; parentheses nest."""
    arguments, stack = [], []
    for kind, value in tokens:
        if kind == "paren" and value == "(":
            stack.append(arguments)
            arguments = []
        elif kind == "paren":
            if not stack:
                raise UnsupportedTemplate(f"unbalanced ) in {where}")
            nested, arguments = arguments, stack.pop()
            arguments.append(("command", _call(nested, where)))
        elif kind == "string":
            arguments.append(("literal", _unquote(value)))
        elif kind == "number":
            arguments.append(("literal", int(value)))
        elif kind == "word":
            arguments.append(("field", value))
        else:
            raise UnsupportedTemplate(f"{value!r} is not supported in {where}")
    if stack:
        raise UnsupportedTemplate(f"unbalanced ( in {where}")
    return _call(arguments, where)


_FUNCTIONS = {"eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "len"}


def _call(arguments: list, where: str) -> list:
    if not arguments:
        raise UnsupportedTemplate(f"missing value in {where}")
    kind, value = arguments[0]
    if kind == "field" and not value.startswith((".", "$")):
        if value not in _FUNCTIONS:
            raise UnsupportedTemplate(f"function {value!r} is not supported (in {where})")
        return ["call", value, arguments[1:]]
    if len(arguments) > 1:
        raise UnsupportedTemplate(f"{value!r} is not a function and takes no arguments (in {where})")
    return ["value", arguments[0]]


def _unquote(literal: str) -> str:
    return re.sub(r"\\(.)", lambda match: _escape(match.group(1)), literal[1:-1])


def _escape(character: str) -> str:
    if character not in _ESCAPES:
        raise UnsupportedTemplate(f"string escape \\{character} is not supported")
    return _ESCAPES[character]


def _execute(nodes: list[_Node], dot: Any, variables: dict) -> str:
    out = []
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "output":
            out.append(_printed(_evaluate(node.command, dot, variables)))
        elif node.kind == "if":
            for command, body in node.branches:
                if command is None or _truth(_evaluate(command, dot, variables)):
                    out.append(_execute(body, dot, variables))
                    break
        else:
            items = _evaluate(node.command, dot, variables)
            if not isinstance(items, list):
                raise UnsupportedTemplate(f"range over {type(items).__name__} is not supported")
            for position, item in enumerate(items):
                names = node.variables
                scope = dict(variables)
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = position, item
                elif names:
                    scope[names[0]] = item
                out.append(_execute(node.body, item, scope))
    return "".join(out)


def _evaluate(command: list, dot: Any, variables: dict) -> Any:
    if command[0] == "value":
        return _argument(command[1], dot, variables)
    name, arguments = command[1], command[2]
    if name in ("and", "or") and not arguments:
        raise UnsupportedTemplate(f"{name} needs at least one argument")
    if name == "and":
        for argument in arguments:
            value = _argument(argument, dot, variables)
            if not _truth(value):
                return value
        return value
    if name == "or":
        for argument in arguments:
            value = _argument(argument, dot, variables)
            if _truth(value):
                return value
        return value
    values = [_argument(argument, dot, variables) for argument in arguments]
    if name == "not":
        _arity(name, values, 1)
        return not _truth(values[0])
    if name == "len":
        _arity(name, values, 1)
        if not isinstance(values[0], (str, list, dict)):
            raise UnsupportedTemplate(f"len of {values[0]!r}")
        return len(values[0])
    if name == "eq":
        if len(values) < 2:
            raise UnsupportedTemplate("eq needs two or more arguments")
        return any(_compare(values[0], other) == 0 for other in values[1:])
    _arity(name, values, 2)
    order = _compare(values[0], values[1])
    return {"ne": order != 0, "lt": order < 0, "le": order <= 0, "gt": order > 0, "ge": order >= 0}[name]


def _arity(name: str, values: list, count: int) -> None:
    if len(values) != count:
        raise UnsupportedTemplate(f"{name} takes {count} argument(s), got {len(values)}")


def _compare(left: Any, right: Any) -> int:
    """Go compares only values of one basic kind: both integers or both strings."""
    if isinstance(left, bool) or isinstance(right, bool) or type(left) is not type(right) \
            or not isinstance(left, (int, str)):
        raise UnsupportedTemplate(f"incompatible types for comparison: {left!r} and {right!r}")
    return (left > right) - (left < right)


def _argument(argument: tuple, dot: Any, variables: dict) -> Any:
    kind, value = argument
    if kind == "literal":
        return value
    if kind == "command":
        return _evaluate(value, dot, variables)
    if value == ".":
        return dot
    if value.startswith("$"):
        name, _, chain = value.partition(".")
        if name not in variables:
            raise UnsupportedTemplate(f"undefined variable {name}")
        return _fields(variables[name], chain)
    return _fields(dot, value[1:])


def _fields(value: Any, chain: str) -> Any:
    for name in chain.split(".") if chain else []:
        if isinstance(value, dict) and name in value:
            value = value[name]
        elif not isinstance(value, dict) and hasattr(value, name) and name[:1].isupper():
            value = getattr(value, name)
        else:
            raise UnsupportedTemplate(f"no field {name} in {value!r}")
    return value


def _truth(value: Any) -> bool:
    if isinstance(value, (bool, int, str, list, dict)):
        return bool(value)
    return value is not None


def _printed(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    raise UnsupportedTemplate(f"printing {type(value).__name__} is not supported")
