"""Function calling on the chat route (spec 3.6): which tools apply, the grammar that forces a call, its parsing.

The model is asked for `{"function": {"_name": <tool>, <arguments>...}}`; decoding is constrained to exactly that by
a JSON schema with one `$defs` entry per tool. With `tool_choice` "auto" (the default) a synthetic `no_tool` tool
lets the model answer in plain words instead.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from router.errors import InferError
from router.openai_schemas import LoraxToolChoice, NamedToolChoice, Tool, ToolCall, ToolCallFunction, ToolChoice

NO_TOOL = "no_tool"
NO_TOOL_DEFINITION: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": NO_TOOL,
        "description": "Answer in plain words when none of the other tools fits the request.",
        "parameters": {
            "type": "object",
            "properties": {"content": {"type": "string", "description": "The answer to the user."}},
            "required": ["content"],
        },
    },
}
DEFAULT_TOOL_PROMPT = (
    "Reply with a single JSON object that calls the most suitable of the functions above, in the form "
    '{"function": {"_name": <function name>, <argument>: <value>, ...}}.'
)


class ToolError(InferError):
    status_code = 422
    error_type = "tool_error"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Tool error: {reason}")


@dataclass(frozen=True)
class ToolPlan:
    """The tools offered to the model (as the chat template sees them) and the grammar of a call to one of them."""

    tools: list[dict[str, Any]]
    schema: dict[str, Any]

    def prompt_suffix(self, template_uses_tools: bool, tool_prompt: str | None) -> str:
        """Text appended to the last message: the tools themselves when the template does not show them."""
        instruction = DEFAULT_TOOL_PROMPT if tool_prompt is None else tool_prompt
        if template_uses_tools:
            return "\n---\n" + instruction
        return "\n---\n" + json.dumps(self.tools) + "\n" + instruction


def _chosen_name(choice: ToolChoice | None) -> str | None:
    if isinstance(choice, NamedToolChoice):
        return choice.function.name
    if isinstance(choice, LoraxToolChoice):
        return choice.Function.name
    if choice in (None, "auto", "required", "none"):
        return None
    return choice


def plan_tools(tools: list[Tool] | None, choice: ToolChoice | None, with_response_format: bool) -> ToolPlan | None:
    """None when no tool applies (no tools, or `tool_choice: "none"`); raises ToolError for a bad combination."""
    if not tools or choice == "none":
        return None
    if with_response_format:
        raise ToolError("Response format and tools are mutually exclusive")
    definitions = [tool.model_dump(exclude_none=True) for tool in tools]
    name = _chosen_name(choice)
    if name is not None:
        definitions = [d for d in definitions if d["function"]["name"] == name]
        if not definitions:
            raise ToolError(f"Tool with name {name} not found")
    elif choice != "required":
        definitions.append(NO_TOOL_DEFINITION)
    return ToolPlan(definitions, _grammar(definitions))


def _grammar(definitions: list[dict[str, Any]]) -> dict[str, Any]:
    defs = {}
    for definition in definitions:
        function = definition["function"]
        parameters = function.get("parameters", {})
        properties, required = parameters.get("properties", {}), parameters.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise ToolError(f"the parameters of {function['name']} are not an object schema")
        defs[function["name"]] = {
            "type": "object",
            "properties": {"_name": {"type": "string", "const": function["name"]}, **properties},
            "required": ["_name", *required],
        }
    return {
        "$defs": defs,
        "type": "object",
        "properties": {"function": {"anyOf": [{"$ref": f"#/$defs/{name}"} for name in defs]}},
        "required": ["function"],
    }


def parse_tool_call(text: str) -> tuple[str | None, ToolCall | None]:
    """The model's output as (plain answer, None) for `no_tool`, else (None, the call)."""
    try:
        arguments = dict(json.loads(text)["function"])
        name = arguments.pop("_name")
    except (ValueError, KeyError, TypeError) as error:
        raise ToolError(f"the model's output is not a function call ({error!r}): {text!r}") from None
    if name == NO_TOOL:
        content = arguments.get("content")
        return (content if isinstance(content, str) else json.dumps(content)), None
    call = ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=ToolCallFunction(name=str(name), arguments=json.dumps(arguments)),
    )
    return None, call
