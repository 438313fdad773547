"""The rewrite prompt: the model answers the instruction itself, seeing the reference."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedsdr.data.schema import Record

DEFAULT_SYSTEM = (
    "Answer the instruction yourself, in your own words. A reference answer is provided: "
    "use it only as a guide to get the content right. Do not mention, quote or refer to it."
)
DEFAULT_USER = "{instruction}\n\nReference answer (for guidance only):\n{reference}"
_PLACEHOLDER = re.compile(r"\{(instruction|reference)\}")


class RewriteTemplate(BaseModel):
    """Text of the rewrite prompt; rendered with the model's own chat template."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    system: str = Field(
        DEFAULT_SYSTEM,
        description="System line. Empty string: no system message (the chat template may "
        "then insert its own default).",
    )
    user: str = Field(
        DEFAULT_USER,
        description="User message; `{instruction}` is the record's prompt (instruction and "
        "input), `{reference}` its reference output.",
    )

    @field_validator("user")
    @classmethod
    def _has_placeholders(cls, value: str) -> str:
        missing = [p for p in ("{instruction}", "{reference}") if p not in value]
        if missing:
            raise ValueError(f"user template lacks {', '.join(missing)}")
        return value


def build_rewrite_messages(record: Record, template: RewriteTemplate) -> list[dict[str, str]]:
    """Chat messages asking the model to answer `record` in its own words."""
    values = {"instruction": record.prompt, "reference": record.output}
    user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template.user)
    messages = [{"role": "system", "content": template.system}] if template.system else []
    return [*messages, {"role": "user", "content": user}]
