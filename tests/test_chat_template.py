"""Chat templates rendered by llmrun.chat vs transformers' apply_chat_template on the same template string."""
from __future__ import annotations

import pytest

from llmrun.text.chat_template import CHATML_TEMPLATE, ChatTemplateError, render_chat
from llmrun.errors import LlmrunError

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Multi-line with indented blocks: only renders like HF with trim_blocks + lstrip_blocks; uses tojson on
# non-ASCII text and loop controls.
BLOCKY = """{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
<{{ message['role'] }}>{{ message['content'] | tojson }}</{{ message['role'] }}>
{% endfor %}
{% if add_generation_prompt %}
<assistant>
{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "  Paris.  "},
    {"role": "user", "content": "And of Japan? 東京 ✓ café"},
]
ALTERNATING = [m for m in CONVERSATION if m["role"] != "system"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def _hf(tok, template, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template,messages", [
    (SMOLLM2, CONVERSATION), (SMOLLM2, ALTERNATING), (LLAMA3, CONVERSATION), (MISTRAL, ALTERNATING),
    (BLOCKY, CONVERSATION), (CHATML_TEMPLATE, CONVERSATION),
], ids=["smollm2", "smollm2-nosys", "llama3", "mistral", "blocky", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(hf_tokenizer, template, messages, add_generation_prompt):
    ours = render_chat(messages, template, add_generation_prompt=add_generation_prompt,
                       bos_token="<s>", eos_token="</s>")
    assert ours == _hf(hf_tokenizer, template, messages, add_generation_prompt)


def test_no_template_falls_back_to_chatml():
    text = render_chat([{"role": "user", "content": "hi"}], None)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_raise_exception_is_one_line_llmrun_error(hf_tokenizer):
    bad = [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "no"}]
    from jinja2.exceptions import TemplateError
    with pytest.raises(TemplateError):          # the reference refuses too
        _hf(hf_tokenizer, MISTRAL, bad, True)
    with pytest.raises(LlmrunError) as e:
        render_chat(bad, MISTRAL)
    assert "Conversation roles must alternate" in str(e.value)
    assert "\n" not in str(e.value)


def test_syntax_error_is_one_line():
    with pytest.raises(ChatTemplateError) as e:
        render_chat([{"role": "user", "content": "x"}], "{% for m in messages %}{{ m.content }")
    assert "\n" not in str(e.value) and "compile" in str(e.value)


def test_sandbox_blocks_attribute_tricks():
    evil = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(LlmrunError):
        render_chat([{"role": "user", "content": "x"}], evil + "{{ ''.__class__.__subclasses__() }}")


def test_strftime_now_available(hf_tokenizer):
    tmpl = "{{ strftime_now('%Y') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "x"}]
    assert render_chat(msgs, tmpl) == _hf(hf_tokenizer, tmpl, msgs, True)
