"""Writes tests/fixtures/chat/expected.json: chat templates rendered by transformers'
render_jinja_template (what apply_chat_template(tokenize=False) calls, with the special tokens
as keyword arguments) for several conversations. Run by hand:
    pip install transformers jinja2 && python3 tools/make_chat_fixtures.py
"""
import json
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat"

TEMPLATES = {
    # Qwen2-Instruct (ChatML with a default system message).
    "qwen2": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    # Llama 3 style: bos_token, .strip(), raise_exception, block whitespace control.
    "llama3": """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}
""",
    # Mistral style: system folded into the first user turn, alternation enforced.
    "mistral": """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system is defined %}
            {{- ' [INST] ' + system + '\n\n' + message['content'].strip() + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'].strip() + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token}}
    {%- endif %}
{%- endfor %}
""",
    # Tool-calling templates print JSON with transformers' tojson (Python separators, no HTML escapes).
    # transformers passes tools and documents as None when there are none.
    "tools": "{% if tools is defined and tools is none %}no tools\n{% endif %}{% if documents is none %}no documents\n{% endif %}"
             "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    "json": "{% for message in messages %}{{ message | tojson }}\n{{ message['content'] | tojson(indent=2) }}\n{% endfor %}"
            "{{ {'n': messages | length, 'list': [1, 2.5, none, true], 'html': '<a href=\"x\">&</a>', 'empty': []} | tojson(indent=2) }}",
}

TOKENS = {
    "json": {},
    "tools": {},
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}],
    [
        {"role": "user", "content": "  Hi there  "},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke\nwith two lines."},
    ],
    [
        {"role": "system", "content": "Be nice. {{ not a tag }}"},
        {"role": "user", "content": "Unicode: héllo 日本 🎉"},
        {"role": "assistant", "content": "Ok."},
    ],
    # Mistral's template refuses this one (roles must alternate starting with the user).
    [{"role": "assistant", "content": "I speak first."}],
]

cases = []
for name, src in TEMPLATES.items():
    for conv in CONVERSATIONS:
        for gen in (True, False):
            try:
                out = render_jinja_template(conversations=[conv], chat_template=src,
                                            add_generation_prompt=gen, **TOKENS[name])
                out = out[0] if isinstance(out, (list, tuple)) else out
                out = out[0] if isinstance(out, list) else out
                cases.append({"template": name, "messages": conv, "add_generation_prompt": gen, "expected": out})
            except Exception as e:  # noqa: BLE001 - the error is the expected result
                cases.append({"template": name, "messages": conv, "add_generation_prompt": gen, "error": str(e)})

OUT.mkdir(parents=True, exist_ok=True)
for name, src in TEMPLATES.items():
    d = OUT / name
    d.mkdir(exist_ok=True)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": src, **TOKENS[name]}, indent=1, ensure_ascii=False) + "\n")
(OUT / "expected.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
print(len(cases), "cases,", sum("error" in c for c in cases), "errors")
