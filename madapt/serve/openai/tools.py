"""Tool calls on chat completions, as OpenAI defines them and vLLM serves them: the request's `tools` and
`tool_choice` read and checked, what the model must write for each choice, and its text read back as calls.

`tool_choice` says who decides:
- `"none"`: the tools are shown to the model (rendered by the chat template) but no call is read back.
- `"auto"` (the default when tools are given): the model decides; its text is read in the chat template's
  tool-call format (`tool_format`), and becomes `tool_calls` when it parses as calls, else plain content.
- `"required"`: the output is constrained by the grammar engine to a JSON list of one or more calls
  `[{"name": ..., "arguments": {...}}]`, each `arguments` valid against its function's schema (one call
  when `parallel_tool_calls` is false).
- `{"type": "function", "function": {"name": ...}}`: the output is constrained to that function's
  arguments object, valid against its schema.

Every problem with the fields is a 400 naming it (`tools[0].function.name`), a `parameters` schema that
llguidance cannot compile included (with the compiler's message): a request is refused before it runs,
never answered with calls the client cannot use.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from madapt.json_grammar import schema_problem
from madapt.serve.openai.errors import ProtocolError, shown

CHOICES = ("none", "auto", "required")
NAMED = "function"
"""The `choice` of a plan whose `tool_choice` names one function."""
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""A function name as OpenAI accepts it."""
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
HERMES, LLAMA_JSON = "hermes", "llama3_json"
"""The tool-call formats read back under `auto` (`read_calls`)."""
HERMES_OPEN = "<tool_call>"
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"


def _refuse(param: str, message: str) -> ProtocolError:
    return ProtocolError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask for: the functions (OpenAI's tool objects, `parameters` filled in), who
    decides (`choice`: one of `CHOICES` or `NAMED`), the named function, and whether calls may be parallel."""

    tools: list[dict[str, Any]]
    choice: str
    name: str | None = None
    parallel: bool = True

    def function(self, name: str) -> dict[str, Any]:
        return next(tool["function"] for tool in self.tools if tool["function"]["name"] == name)

    def constraint(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow (`required` and a named function), or None."""
        if self.choice == NAMED:
            assert self.name is not None
            parameters: dict[str, Any] = self.function(self.name)["parameters"]
            return parameters
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool["function"]["name"]},
                    "arguments": tool["function"]["parameters"],
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in self.tools
        ]
        calls_schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        return calls_schema | ({} if self.parallel else {"maxItems": 1}) | self._shared_defs()

    def _shared_defs(self) -> dict[str, Any]:
        """The functions' `$defs`, at the root of the calls' schema where their `#/$defs/...` refs point; a
        name two functions define differently is a 400."""
        defs: dict[str, Any] = {}
        for i, tool in enumerate(self.tools):
            own = tool["function"]["parameters"].get("$defs")
            for name, definition in own.items() if isinstance(own, dict) else ():
                if defs.setdefault(name, definition) != definition:
                    message = (
                        f"$defs/{name} is defined differently by another function; under 'required' they share one"
                    )
                    raise _refuse(f"tools[{i}].function.parameters", message)
        return {"$defs": defs} if defs else {}


def read_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolPlan | None:
    """The plan for a request's `tools`, `tool_choice` and `parallel_tool_calls`, or None when it has no
    tools; a `ProtocolError` (400) naming the field for anything malformed."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _refuse("parallel_tool_calls", "must be true or false")
    if tools is not None and not isinstance(tools, list):
        raise _refuse("tools", 'must be a list of {"type": "function", "function": {...}} objects')
    functions = [_function(tool, f"tools[{i}]") for i, tool in enumerate(tools or [])]
    names = [function["name"] for function in functions]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise _refuse(f"tools[{i}].function.name", f"{shown(name)} is given twice")
    choice, named = _choice(tool_choice, names)
    if not functions:
        return None
    tools_read = [{"type": "function", "function": function} for function in functions]
    plan = ToolPlan(tools_read, choice, named, parallel=parallel_tool_calls is not False)
    if choice == "required":
        problem = schema_problem(plan.constraint() or {})
        if problem:
            raise _refuse("tools", f"the calls' schema cannot be enforced: {problem}")
    return plan


def _function(tool: Any, where: str) -> dict[str, Any]:
    """One tool's function, checked: a name, an optional description, a `parameters` schema that compiles."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise _refuse(f"{where}.type", 'each tool must be an object with "type": "function"')
    function = tool.get("function")
    if not isinstance(function, dict):
        raise _refuse(f"{where}.function", "must be an object with a name")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _refuse(f"{where}.function.name", "must be 1-64 letters, digits, '_', '.' or '-'")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise _refuse(f"{where}.function.description", "must be a string")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise _refuse(f"{where}.function.parameters", "must be a JSON Schema object")
    problem = schema_problem(parameters)
    if problem:
        raise _refuse(f"{where}.function.parameters", f"cannot be enforced: {problem}")
    read = {"name": name, "parameters": parameters}
    return read | ({"description": description} if description else {})


def _choice(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    """(`choice`, the named function) of a `tool_choice`; the default is `auto` with tools, else `none`."""
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise _refuse("tool_choice", f"must be 'none', 'auto', 'required' or a function, not {shown(tool_choice)}")
        if tool_choice == "required" and not names:
            raise _refuse("tool_choice", "'required' needs tools")
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(function, dict):
        raise _refuse("tool_choice", 'must be a string or {"type": "function", "function": {"name": ...}}')
    name = function.get("name")
    if name not in names:
        raise _refuse("tool_choice.function.name", f"{shown(name)} is not one of the request's tools")
    return NAMED, name


def read_history_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` as chat templates take them: each `arguments` an object (OpenAI
    sends it as a JSON string; templates write it with `tojson`, as vLLM renders them)."""
    if not isinstance(tool_calls, list):
        raise _refuse(where, "must be a list of tool calls")
    calls = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _refuse(f"{where}[{j}].function", 'must be an object with a "name" and "arguments"')
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError):
            raise _refuse(f"{where}[{j}].function.arguments", "must be a string of a JSON object") from None
        if not isinstance(arguments, dict):
            raise _refuse(f"{where}[{j}].function.arguments", "must be a string of a JSON object")
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{j}"
        calls.append(
            {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}}
        )
    return calls


# -- the output read back ------------------------------------------------------------------------------


def new_call(name: str, arguments: str) -> dict[str, Any]:
    """A call as responses carry it: `arguments` a JSON string."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def read_output(
    plan: ToolPlan, text: str, finish_reason: str | None, tool_format: str | None
) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """(content, calls, finish_reason) of a choice's whole text. A constrained call that was cut short
    (`length`) keeps its finish reason; a `required` list that does not parse is returned as content."""
    if plan.choice == NAMED:
        assert plan.name is not None
        return None, [new_call(plan.name, text)], "tool_calls" if finish_reason == "stop" else finish_reason
    if plan.choice == "required":
        calls = _json_calls(text)
        return (None, calls, "tool_calls") if calls and finish_reason == "stop" else (text, [], finish_reason)
    if plan.choice == "auto":
        content, calls = read_calls(text, tool_format or HERMES)
        if calls:
            return content, calls, "tool_calls"
    return text, [], finish_reason


def surely_content(text: str, tool_format: str | None) -> int:
    """How many leading characters of a free answer are content whatever comes next: in Hermes format, the
    text before `<tool_call>` (or before what may become it), less trailing blanks; in Llama 3.1's, all of
    it once it does not start like a call (`{` or `<|python_tag|>`), else none."""
    if tool_format == LLAMA_JSON:
        start = text.lstrip()
        could_call = start.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(start)
        return 0 if could_call else len(text)
    end = text.find(HERMES_OPEN)
    if end < 0:
        end = len(text) - next((k for k in range(len(HERMES_OPEN) - 1, 0, -1) if text.endswith(HERMES_OPEN[:k])), 0)
    return len(text[:end].rstrip())  # trailing blanks wait: before a call they are not content


def read_calls(text: str, tool_format: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The calls in a model's free text, in `tool_format`, with the text around them (None when empty);
    ([], the text) when it holds none, or when any call in it does not parse (then it is plain content).

    `hermes` (Qwen, Hermes, and madapt's own rendering for templates without tools): each call is
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, text may stand around them. `llama3_json`
    (Llama 3.1-3.3): the whole answer is `{"name": ..., "parameters": {...}}`, after an optional
    `<|python_tag|>`, several separated by `;`."""
    if tool_format == LLAMA_JSON:
        calls = _llama_calls(text.strip().removeprefix(PYTHON_TAG).strip())
        return (None, calls) if calls else (text, [])
    found = HERMES_CALL.findall(text)
    calls = [call for part in found if (call := _call(part))]
    if not found or len(calls) != len(found):
        return text, []
    content = text[: text.index(HERMES_OPEN)].rstrip()
    return content or None, calls


def _call(text: str) -> dict[str, Any] | None:
    """One call of `{"name": ..., "arguments": {...}}`, or None."""
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return _as_call(found, "arguments")


def _llama_calls(body: str) -> list[dict[str, Any]]:
    """The calls of `{...}; {...}` (each `{"name", "parameters"}`), or [] unless all of `body` is calls."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            found, at = decoder.raw_decode(body, at)
        except ValueError:
            return []
        call = _as_call(found, "parameters")
        if call is None:
            return []
        calls.append(call)
        while at < len(body) and body[at] in "; \t\n":
            at += 1
    return calls


def _as_call(found: Any, arguments_key: str) -> dict[str, Any] | None:
    if not isinstance(found, dict) or not isinstance(found.get("name"), str):
        return None
    arguments = found.get(arguments_key, found.get("arguments"))
    if not isinstance(arguments, dict):
        return None
    return new_call(found["name"], json.dumps(arguments, ensure_ascii=False))


def _json_calls(text: str) -> list[dict[str, Any]]:
    """The calls of a JSON list of `{"name", "arguments"}` objects (what `required` constrains), or []."""
    try:
        found = json.loads(text)
    except ValueError:
        return []
    calls = [_as_call(item, "arguments") for item in found] if isinstance(found, list) else []
    return [call for call in calls if call] if all(calls) else []
