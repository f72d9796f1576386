"""Record formats, detected from the fields and turned into one shape: a list of chat messages.

| format            | fields                                            |
|-------------------|---------------------------------------------------|
| ``messages``      | ``messages``: [{role, content}, ...] (also ``conversations``) |
| ``prompt_response`` | ``prompt`` + ``response`` (or ``completion``/``answer``) |
| ``instruction``   | ``instruction`` (+ optional ``input``) + ``output`` |
| ``text``          | ``text``: raw text, every token trained             |

Detection looks at the first record; ``format:`` in the config overrides it, and ``fields:``
renames fields first (``{prompt: question}`` reads the prompt from ``question``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixtune.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    messages: list[dict] | None  # chat form; None for raw text
    text: str | None  # raw text form
    answer: str | None  # reference answer for accuracy, if any


def detect(record: dict) -> str:
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
        records = [_rename(r, fields) for r in records]
    if fmt == "auto":
        fmt = detect(records[0])
        if fmt == "unknown":
            raise DataError(
                f"{where}: cannot detect the record format from fields {sorted(records[0])}; "
                "expected messages, prompt+response, instruction+output, or text "
                "(or set format: and fields: in the config)"
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
            raise DataError(f"{where}: record {i + 1}: {e}") from None
        ans = rec.get(answer_field)
        if ans is not None:
            ex.answer = str(ans)
        out.append(ex)
    return out


def _rename(rec: dict, fields: dict) -> dict:
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


def _from_messages(rec: dict) -> Example:
    msgs = rec.get("messages", rec.get("conversations"))
    if not isinstance(msgs, list) or not msgs:
        raise DataError("field 'messages' must be a non-empty list of {role, content}")
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise DataError("each message must be an object with 'role' and 'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"bad message {m!r}: role must be one of {ROLES}, content a string")
        out.append({"role": role, "content": _unicode(content, "content")})
    if out[-1]["role"] != "assistant":
        raise DataError("the last message must be from the assistant (the trained response)")
    return Example(out, None, out[-1]["content"])


def _from_prompt_response(rec: dict) -> Example:
    prompt = _need(rec, "prompt", "prompt_response")
    key = next((k for k in ("response", "completion") if k in rec), "response")
    response = _need(rec, key, "prompt_response")
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if isinstance(rec.get("system"), str):
        msgs.insert(0, {"role": "system", "content": _unicode(rec["system"], "system")})
    return Example(msgs, None, response)


def _from_instruction(rec: dict) -> Example:
    instruction = _need(rec, "instruction", "instruction")
    output = _need(rec, "output", "instruction")
    extra = _unicode(str(rec.get("input") or ""), "input")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(msgs, None, output)


def _from_text(rec: dict) -> Example:
    return Example(None, _need(rec, "text", "text"), None)
