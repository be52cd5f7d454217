"""Our chat templates (centered_merge/io/chat_templates.py) against mergekit 0.1.5's, rendered by transformers on
sample conversations; prints one line per (template, conversation) and exits 1 on any difference except in
exaone, where we differ on purpose (mergekit's template leaves indentation in the prompt; see chat_templates.py).

    PYTHONPATH=. bench/peer/.venv/bin/python bench/peer/chat_template_parity.py     (about 5 s)
"""
from __future__ import annotations

import importlib.resources
import sys

from transformers.utils.chat_template_utils import _compile_jinja_template

from centered_merge.io.chat_templates import TEMPLATES

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi there "}],
    "system+user+assistant": [{"role": "system", "content": " Be brief."}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4"}],
    "two turns": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}],
    "alpaca input": [{"role": "user", "content": "Sum"}, {"role": "user_context", "content": "1 2"}],
}


ON_PURPOSE = {"exaone"}


def main() -> int:
    from mergekit._data import chat_templates as mk

    bad = 0
    for name, ours in sorted(TEMPLATES.items()):
        theirs = importlib.resources.files(mk).joinpath(name + ".jinja").read_text()
        for conv_name, conv in CONVERSATIONS.items():
            for gen in (False, True):
                out = []
                for t in (ours, theirs):
                    try:
                        out.append(_compile_jinja_template(t).render(messages=conv, add_generation_prompt=gen,
                                                                     bos_token="<s>", eos_token="</s>"))
                    except Exception as e:  # noqa: BLE001  (both must raise alike: mistral refuses some)
                        out.append(f"error: {type(e).__name__}")
                same = out[0] == out[1] or (out[0].startswith("error") and out[1].startswith("error"))
                bad += not same and name not in ON_PURPOSE
                print(f"{name:8} {conv_name:22} gen={gen!s:5} {'same' if same else ('differs on purpose' if name in ON_PURPOSE else 'DIFFERENT')}")
                if not same:
                    print(f"   ours:     {out[0]!r}\n   mergekit: {out[1]!r}")
    print(f"{bad} difference(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
