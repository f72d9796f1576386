"""Record formats, detected from the fields and turned into one shape: a list of chat messages.

| format              | records it reads                                                    |
|---------------------|---------------------------------------------------------------------|
| ``messages``        | OpenAI chat fine-tuning / TRL ``messages``: [{role, content}, ...]; |
|                     | ShareGPT ``conversations``: [{from, value}, ...]                    |
| ``prompt_response`` | ``prompt`` + ``response`` (or ``completion``) as strings, or TRL's  |
|                     | conversational ``prompt`` + ``completion`` as message lists         |
| ``instruction``     | ``instruction`` (+ optional ``input``) + ``output``                 |
| ``text``            | ``text``: raw text, every token trained                             |

Which turns are trained follows the source's own rule: every assistant turn, except one with
``"weight": 0`` (OpenAI); the ``completion`` messages but never the ``prompt`` ones (TRL).
OpenAI ``tool``/``function`` messages, assistant ``tool_calls``/``function_call`` and a record's
``tools`` are kept (arguments parsed to objects, as chat templates expect) and rendered by the
chat template; ShareGPT's ``function_call`` and ``observation`` turns become an assistant tool
call and a tool result. Content given as a list of parts keeps the text parts, joined; any other
part (an image, audio) is refused, since a text model cannot be trained on it.

A ``prompt`` + ``answer`` record is not a format: ``answer`` is the reference answer scored by
evaluation; ``fields: {response: answer}`` trains on it. Detection looks at the first record
(a later record of another shape is an error naming it and what it looks like); ``format:`` in
the config overrides it, and ``fields:`` renames fields first (``{prompt: question}`` reads the
prompt from ``question``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mixtune.errors import DataError

ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"

LOOKS = {
    "messages": "messages",
    "prompt_response": "prompt+response",
    "instruction": "instruction+output",
    "text": "text",
}
"""How an error names each format."""

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": TOOL_ROLE,
    "tool": TOOL_ROLE,
    "function_call": "assistant",
}
OPENAI_ROLES = {"developer": "system", "function": TOOL_ROLE}  # the rest are themselves


@dataclass
class Example:
    messages: list[dict] | None  # chat form; None for raw text
    text: str | None  # raw text form
    answer: str | None  # reference answer for accuracy, if any
    tools: list[dict] | None = None  # tool definitions the chat template renders, if any


def detect(record: dict) -> str:
    """The format of ``record`` (a key of :data:`LOOKS`), or ``"unknown"``."""
    if "messages" in record or "conversations" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and any(k in record for k in ("response", "completion")):
        return "prompt_response"
    if "text" in record:
        return "text"
    return "unknown"


def normalize(
    records: list[dict], fmt: str, fields: dict | None, where: str, answer_field: str = "answer"
) -> list[Example]:
    """Turn raw records into :class:`Example`s; a :class:`DataError` names the first bad one."""
    if not records:
        raise DataError(f"{where}: no records; the source is empty")
    if fields:
        records = [rename_fields(r, fields) for r in records]
    detected = fmt == "auto"
    if detected:
        fmt = detect(records[0])
        if fmt == "unknown":
            hint = ""
            if "prompt" in records[0] and "answer" in records[0]:
                hint = (
                    "; 'answer' is the reference answer evaluation scores, to train on it "
                    "set fields: {response: answer}"
                )
            raise DataError(
                f"{where}: cannot detect the record format from fields {sorted(records[0])}; "
                "expected messages (or conversations), prompt+response (or completion), "
                f"instruction+output, or text (or set format: and fields: in the config){hint}"
            )
    convert = {
        "messages": _from_messages,
        "prompt_response": _from_prompt_response,
        "instruction": _from_instruction,
        "text": _from_text,
    }[fmt]
    out = []
    for i, rec in enumerate(records):
        try:
            ex = convert(rec)
        except DataError as e:
            looks = detect(rec)
            if looks not in (fmt, "unknown"):
                first = "the file's first record is" if detected else "the configured format is"
                raise DataError(
                    f"{where}: record {i + 1} looks like {LOOKS[looks]}, but {first} "
                    f"{LOOKS[fmt]}; set format: {looks} for a file of such records, or split "
                    "the file by format"
                ) from None
            raise DataError(f"{where}: record {i + 1}: {e}") from None
        ans = rec.get(answer_field)
        if ans is not None:
            ex.answer = str(ans)
        out.append(ex)
    return out


def rename_fields(rec: dict, fields: dict) -> dict:
    rec = dict(rec)
    for target, source in fields.items():
        if source in rec:
            rec[target] = rec.pop(source)
    return rec


def _need(rec: dict, key: str, fmt: str) -> str:
    if key not in rec:
        raise DataError(f"missing field '{key}' for format {fmt} (fields: {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"field '{key}' must be a string, got {type(value).__name__}")
    return _unicode(value, key)


def _unicode(value: str, key: str) -> str:
    """JSON can smuggle lone surrogates (``"\\ud800"``) that no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"field '{key}' is not valid Unicode ({e.reason} at character {e.start})"
        ) from None
    return value


def _show(value: object) -> str:
    """A short repr for an error message (a record may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------------------------
# Chat messages: OpenAI / TRL (role, content) and ShareGPT (from, value)


def _from_messages(rec: dict) -> Example:
    key = "messages" if "messages" in rec else "conversations"
    if key not in rec:
        raise DataError(f"missing field 'messages' (or 'conversations') (fields: {sorted(rec)})")
    msgs = rec[key]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"field '{key}' must be a non-empty list of {{role, content}}")
    out = [_message(m) for m in msgs]
    if isinstance(rec.get("system"), str) and out[0]["role"] != "system":  # ShareGPT's system
        out.insert(0, {"role": "system", "content": _unicode(rec["system"], "system")})
    return _conversation(out, rec)


def _from_prompt_response(rec: dict) -> Example:
    key = next((k for k in ("response", "completion") if k in rec), "response")
    if isinstance(rec.get("prompt"), list) or isinstance(rec.get(key), list):
        return _from_prompt_completion(rec, key)
    prompt = _need(rec, "prompt", "prompt_response")
    response = _need(rec, key, "prompt_response")
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if isinstance(rec.get("system"), str):
        msgs.insert(0, {"role": "system", "content": _unicode(rec["system"], "system")})
    return Example(msgs, None, response)


def _from_prompt_completion(rec: dict, key: str) -> Example:
    """TRL's conversational prompt/completion: the prompt's messages are context only."""
    prompt, completion = rec.get("prompt"), rec[key]
    if not (isinstance(prompt, list) and isinstance(completion, list) and completion):
        raise DataError(
            f"conversational prompt/{key}: both must be lists of {{role, content}} messages "
            f"(got {type(prompt).__name__} and {type(completion).__name__})"
        )
    context = [_message(m) for m in prompt]
    for m in context:
        if m["role"] == "assistant":
            m["weight"] = 0  # an assistant turn of the prompt is context, never trained
    return _conversation(context + [_message(m) for m in completion], rec)


def _conversation(msgs: list[dict], rec: dict) -> Example:
    if msgs[-1]["role"] != "assistant":
        raise DataError("the last message must be from the assistant (the trained response)")
    if all(m.get("weight", 1) == 0 for m in msgs if m["role"] == "assistant"):
        raise DataError("every assistant message has weight 0: nothing to train on; drop it")
    return Example(msgs, None, msgs[-1]["content"], _tools(rec.get("tools")))


def _message(m: object) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"each message must be an object with 'role' and 'content', got {_show(m)}")
    if "role" not in m and "from" in m:
        return _sharegpt_message(m)
    role = m.get("role")
    role = OPENAI_ROLES.get(role, role)
    if role not in (*ROLES, TOOL_ROLE):
        raise DataError(
            f"bad message {_show(m)}: role must be one of {(*ROLES, TOOL_ROLE)} "
            "(or ShareGPT's 'from': human, gpt, system, function_call, observation)"
        )
    calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else [])
    if calls and role != "assistant":
        raise DataError(f"bad message {_show(m)}: only an assistant message makes tool calls")
    content = m.get("content")
    if content is None and calls:
        content = ""  # OpenAI: an assistant turn that only calls tools has null content
    out = {"role": role, "content": _content(content, m)}
    if calls:
        out["tool_calls"] = [_tool_call(c) for c in _listed(calls, "tool_calls")]
    for key in ("name", "tool_call_id"):
        if role == TOOL_ROLE and isinstance(m.get(key), str):
            out[key] = m[key]
    weight = m.get("weight")
    if weight is not None:
        if weight not in (0, 1):
            raise DataError(f"bad message {_show(m)}: weight must be 0 or 1, got {weight!r}")
        if weight == 1 and role != "assistant":
            raise DataError(
                f"bad message {_show(m)}: weight 1 on a {role} message; only assistant "
                "messages are trained"
            )
        if weight == 0 and role == "assistant":
            out["weight"] = 0
    return out


def _sharegpt_message(m: dict) -> dict:
    frm, value = m["from"], m.get("value")
    role = SHAREGPT_ROLES.get(frm)
    if role is None:
        raise DataError(f"bad message {_show(m)}: 'from' must be one of {sorted(SHAREGPT_ROLES)}")
    if not isinstance(value, str):
        raise DataError(f"bad message {_show(m)}: 'value' must be a string")
    if frm != "function_call":
        return {"role": role, "content": _unicode(value, "value")}
    try:  # LLaMA-Factory: the value is JSON, {"name", "arguments"} or a list of them
        calls = json.loads(value)
    except (ValueError, RecursionError):
        raise DataError(
            f"bad message {_show(m)}: a function_call value must be JSON "
            '{"name": ..., "arguments": {...}} (or a list of them)'
        ) from None
    calls = calls if isinstance(calls, list) else [calls]
    return {"role": "assistant", "content": "", "tool_calls": [_tool_call(c) for c in calls]}


def _content(content: object, m: dict) -> str:
    """A message's text: a string, or the text parts of a list of content parts, joined."""
    if isinstance(content, str):
        return _unicode(content, "content")
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(
                    f"a content part of type {kind!r} ({_show(part)}): mixtune trains text "
                    'models; keep only {"type": "text", "text": ...} parts, or drop the record'
                )
            texts.append(part["text"])
        return _unicode("".join(texts), "content")
    raise DataError(
        f"bad message {_show(m)}: content must be a string or a list of text parts, "
        f"got {type(content).__name__}"
    )


def _listed(value: object, key: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"'{key}' must be a list, got {type(value).__name__}")
    return value


def _tool_call(call: object) -> dict:
    """``{"type": "function", "function": {"name", "arguments": {...}}}`` (+ ``id``): the
    shape Hugging Face chat templates render; OpenAI's JSON-string arguments are parsed."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(f"a tool call must have a function name, got {_show(call)}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            args = None
    if not isinstance(args, dict):
        raise DataError(
            f"tool call '{fn['name']}': arguments must be a JSON object, got {_show(args)}"
        )
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tools(tools: object) -> list[dict] | None:
    """A record's tool definitions (OpenAI's list, or LLaMA-Factory's JSON string of one)."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise DataError("field 'tools' must be a list of tool definitions (or its JSON)")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"field 'tools' must be a list of tool definitions, got {_show(tools)}")
    # a bare function schema (LLaMA-Factory) gets OpenAI's {"type": "function"} wrapper
    return [
        t if "type" in t or "name" not in t else {"type": "function", "function": t} for t in tools
    ]


# ----------------------------------------------------------------------------------------------
def _from_instruction(rec: dict) -> Example:
    instruction = _need(rec, "instruction", "instruction")
    output = _need(rec, "output", "instruction")
    extra = _unicode(str(rec.get("input") or ""), "input")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(msgs, None, output)


def _from_text(rec: dict) -> Example:
    return Example(None, _need(rec, "text", "text"), None)
