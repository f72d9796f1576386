"""The chat template mixtune falls back to when a tokenizer has none.

Rendered text for a prompt/response pair (roles may also be ``system``)::

    <|user|>
    What is 2+3?
    <|assistant|>
    5<eos>

Each message is ``<|role|>\\n`` + content + ``\\n``; an assistant message ends with the
tokenizer's EOS token before the newline, so the model learns to stop. With
``add_generation_prompt`` the text ends in ``<|assistant|>\\n``. The built-in tokenizer
ships this template as its own ``chat_template`` (with ``<|end|>`` as EOS).
"""

DEFAULT_CHAT_TEMPLATE = (
    # Newlines are emitted as expressions: HF renders templates with trim_blocks, which would
    # drop a literal newline that follows a block tag.
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
EOS_TOKEN = "<|end|>"
