"""Chat templates for the names mergekit's `chat_template:` accepts (alpaca, chatml, exaone, llama3, mistral).

Our own Jinja for those public prompt formats, written to render the same text as mergekit 0.1.5's templates
under transformers' settings (trim_blocks, lstrip_blocks); bench/peer/chat_template_parity.py renders both on
sample conversations and compares. One difference on purpose: mergekit's exaone template indents its expression
lines, and Jinja keeps that indentation in the prompt ("        [|system|]..."); ours renders EXAONE's format
without it ("[|system|][|endofturn|]\n[|user|]...\n[|assistant|]"). Variables: messages, add_generation_prompt, bos_token, eos_token.
"""
from __future__ import annotations

CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (
    "{%- for m in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

MISTRAL = (
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set turns = messages[1:] if has_system else messages -%}"
    "{{ bos_token }}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
    "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.first and has_system -%}"
    "{{ ' [INST] ' ~ messages[0]['content'] ~ '\\n\\n' ~ m['content'] ~ ' [/INST]' }}"
    "{%- else -%}{{ ' [INST] ' ~ m['content'] ~ ' [/INST]' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' ~ m['content'] ~ eos_token }}"
    "{%- else -%}{{ raise_exception('only user and assistant roles, after an optional system message') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# alpaca: the last system message (trimmed) first, then one blank line, then each turn under its heading;
# turns are separated by one blank line
ALPACA = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
    "{%- set heads = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} -%}"
    "{%- for m in messages if m['role'] in heads -%}"
    "{{ heads[m['role']] ~ '\\n' ~ (m['content'] | trim) }}"
    "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '### Response:\\n' }}{%- endif -%}"
)

EXAONE = (
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
    "{{ '[|' ~ m['role'] ~ '|]' ~ m['content'] }}"
    "{{ '\\n' if m['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
)

TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}
