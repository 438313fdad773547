"""The rewrite prompt: the model answers the instruction itself, seeing the reference."""

from __future__ import annotations

import re

from fedsdr.config import RewriteTemplate
from fedsdr.data.schema import Record

_PLACEHOLDER = re.compile(r"\{(instruction|reference)\}")

def build_rewrite_messages(record: Record, template: RewriteTemplate) -> list[dict[str, str]]:
    """Chat messages asking the model to answer `record` in its own words."""
    values = {"instruction": record.prompt, "reference": record.output}
    user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template.user)
    messages = [{"role": "system", "content": template.system}] if template.system else []
    return [*messages, {"role": "user", "content": user}]
