"""Tool calls, tool results and tool definitions: rendered by the chat template, or refused.

Many chat templates (mixtune's fallback, SmolLM2's ChatML) silently drop an assistant message's
``tool_calls`` or the ``tools`` passed to them; training on such a rendering teaches the model
to answer without the call it should make. :func:`template_renders` finds out what a template
renders by rendering a conversation with marker names; :func:`check_tools` refuses the examples
that need more.
"""

from __future__ import annotations

from mixtune.data.formats import Example
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
from mixtune.errors import DataError

_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "mixtune_probe_def",
            "description": "d",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
_PROBE = [
    {"role": "user", "content": "u"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "id": "call_0",
                "function": {"name": "mixtune_probe_call", "arguments": {"mixtune_probe_arg": 1}},
            }
        ],
    },
    {"role": "tool", "content": "mixtune_probe_result", "name": "mixtune_probe_call"},
    {"role": "assistant", "content": "a"},
]
_TOOL_PARTS = {
    "calls": "tool calls (assistant `tool_calls`)",
    "results": "tool results (`tool` messages)",
    "definitions": "tool definitions (`tools`)",
}


def template_renders(tokenizer, template: str) -> set[str]:
    """Which tool parts the template renders: ``calls``, ``results``, ``definitions``.

    Probed by rendering a conversation with marker names and checking they come out; a
    template that raises on tool messages renders none."""

    def show(tools) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            return tokenizer.apply_chat_template(
                _PROBE, chat_template=template, tokenize=False, **extra
            )
        except Exception:  # e.g. a template that raises on roles it does not know
            return ""

    plain, with_defs = show(None), show(_PROBE_TOOLS)
    found = set()
    if "mixtune_probe_call" in plain and "mixtune_probe_arg" in plain:
        found.add("calls")
    if "mixtune_probe_result" in plain:
        found.add("results")
    if "mixtune_probe_def" in with_defs:
        found.add("definitions")
    return found


def tool_parts(ex: Example) -> set[str]:
    """The tool parts an example holds (keys of ``template_renders``'s answer)."""
    if ex.messages is None:
        return set()
    parts = {"definitions"} if ex.tools else set()
    for m in ex.messages:
        if m.get("tool_calls"):
            parts.add("calls")
        if m["role"] == "tool":
            parts.add("results")
    return parts


def check_tools(examples: list[Example], tokenizer, template: str, where: str) -> None:
    """Refuse ``examples`` holding tool parts the template drops (one error for them all)."""
    need: set[str] = set()
    n = 0
    for ex in examples:
        parts = tool_parts(ex)
        n += bool(parts)
        need |= parts
    if not need:
        return
    missing = need - template_renders(tokenizer, template)
    if not missing:
        return
    if template == getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        whose = f"the chat template of {name}"
    elif template == DEFAULT_CHAT_TEMPLATE:
        whose = "mixtune's fallback chat template"
    else:
        whose = "model.chat_template"
    raise DataError(
        f"{where}: {n} example(s) hold "
        + " and ".join(_TOOL_PARTS[p] for p in sorted(missing))
        + f", but {whose} cannot render them; use a model whose template does (or set "
        "model.chat_template), or drop those records (or their tool turns)"
    )
