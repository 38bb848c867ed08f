"""A small renderer for the Go-template subset the Helm chart uses (``helm`` is not packaged for
Debian or PyPI, so the tests render the chart themselves and check the YAML that comes out).

Supported, and nothing else (anything unknown raises, so the chart cannot drift past it):
``{{ expr }}`` with ``{{-``/``-}}`` trimming; ``if`` / ``else`` / ``end``; ``define`` and
``include "name" .``; paths ``.Values.a.b``, ``.Release.Name``, ``.Chart.Version``,
``.Chart.AppVersion``; ``not``, ``and``; pipes ``quote``, ``nindent N``, ``toYaml``.
A ``.Values`` path that is not in values.yaml is an error (Helm would render it empty).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class TemplateError(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if m.group(1):
            chunk = chunk.rstrip()
        out.append(("text", chunk))
        out.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = text[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", text[pos:]))
    return out


def _parse(tokens, i: int = 0, stop=("end",)):
    """Nodes until one of ``stop``; returns (nodes, index of the stopping token, its word)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split(" ", 1)[0]
        if word in stop:
            return nodes, i, word
        if word == "if":
            body, i, w = _parse(tokens, i + 1, ("else", "end"))
            other: list = []
            if w == "else":
                other, i, w = _parse(tokens, i + 1, ("end",))
            nodes.append(("if", value[3:], body, other))
            i += 1
        elif word == "define":
            body, i, _ = _parse(tokens, i + 1, ("end",))
            nodes.append(("define", shlex.split(value)[1], body))
            i += 1
        else:
            nodes.append(("expr", value))
            i += 1
    return nodes, i, None


class Chart:
    def __init__(self, root: Path, values: dict, release: str = "rel") -> None:
        self.root = Path(root)
        self.chart = yaml.safe_load((self.root / "Chart.yaml").read_text())
        self.values = values
        self.release = release
        self.defines: dict[str, list] = {}
        for tpl in sorted((self.root / "templates").glob("_*.tpl")):
            self._render(_parse(_tokens(tpl.read_text()))[0])

    def render(self, name: str) -> str:
        return self._render(_parse(_tokens((self.root / "templates" / name).read_text()))[0])

    def render_all(self) -> dict[str, list[dict]]:
        out = {}
        for path in sorted((self.root / "templates").glob("*.yaml")):
            docs = [d for d in yaml.safe_load_all(self.render(path.name)) if d is not None]
            out[path.name] = docs
        return out

    # ------------------------------------------------------------------------------------
    def _render(self, nodes) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "define":
                self.defines[node[1]] = node[2]
            elif node[0] == "if":
                out.append(self._render(node[2] if self._truthy(self._eval(node[1]))
                                        else node[3]))
            else:
                value = self._eval(node[1])
                out.append("" if value is None else str(value))
        return "".join(out)

    @staticmethod
    def _truthy(v: Any) -> bool:
        return bool(v) and v not in ("", 0, "0")

    def _eval(self, expr: str) -> Any:
        stages = [s.strip() for s in expr.split("|")]
        value = self._term(shlex.split(stages[0]))
        for stage in stages[1:]:
            parts = shlex.split(stage)
            fn, args = parts[0], parts[1:]
            if fn == "quote":
                value = '"' + str(value).replace('"', '\\"') + '"'
            elif fn == "nindent":
                pad = " " * int(args[0])
                value = "\n" + "\n".join(pad + line if line else line
                                         for line in str(value).splitlines())
            else:
                raise TemplateError(f"unsupported pipe {fn!r}")
        return value

    def _term(self, words: list[str]) -> Any:
        head, args = words[0], words[1:]
        if head == "include":
            if args[1:] != ["."]:
                raise TemplateError(f"include needs a name and '.': {words}")
            return self._render(self.defines[args[0]]).strip("\n")
        if head == "not":
            return not self._truthy(self._term(args))
        if head == "and":
            return all(self._truthy(self._term([a])) for a in args)
        if head == "toYaml":
            return yaml.safe_dump(self._term(args), default_flow_style=False).rstrip("\n")
        if len(words) != 1:
            raise TemplateError(f"unsupported expression {words}")
        if head.startswith(".Values."):
            value: Any = self.values
            for part in head.split(".")[2:]:
                if not isinstance(value, dict) or part not in value:
                    raise TemplateError(f"{head} is not in values.yaml")
                value = value[part]
            return value
        if head == ".Release.Name":
            return self.release
        if head.startswith(".Chart."):
            return self.chart[head.split(".")[2][0].lower() + head.split(".")[2][1:]]
        raise TemplateError(f"unsupported term {head!r}")
