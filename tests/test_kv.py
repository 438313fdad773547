"""The KV cache reaches the model under the keyword its transformers version knows: `cache`
(5.24) or `past_key_values` (5.17 and earlier 5.x, whose forward drops an unknown `cache`
into `**kwargs`: the engine's cache then stayed empty and decoding failed)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from peft import LoraConfig, get_peft_model
from test_generation import chat
from tiny_llama import tiny_model, tiny_tokenizer
from transformers import LlamaForCausalLM

from fedsdr.generation import GenerationStats, generate_detailed
from fedsdr.kv import cache_kwarg

INSTALLED = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class OldSignatureLlama(LlamaForCausalLM):
    """LlamaForCausalLM with the forward signature from before the rename: the cache comes as
    `past_key_values`; an unknown `cache` falls into `**kwargs` and is ignored, as in 5.17."""

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, use_cache: Any = None, logits_to_keep: int = 0,
                **kwargs: Any) -> Any:
        kwargs.pop("cache", None)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **{INSTALLED: past_key_values})


@pytest.fixture(scope="module")
def models():  # noqa: ANN201
    tok = tiny_tokenizer()
    new = tiny_model(tok)
    old = OldSignatureLlama(new.config).eval()
    old.load_state_dict(new.state_dict())
    return tok, new, old


def test_the_keyword_follows_the_forward_signature(models) -> None:
    _, new, old = models
    assert cache_kwarg(new) == INSTALLED in inspect.signature(type(new).forward).parameters
    assert cache_kwarg(old) == "past_key_values"
    assert cache_kwarg(new.get_decoder()) in inspect.signature(type(new.get_decoder()).forward).parameters
    # a PEFT model passes keywords on: the wrapped model's signature decides
    wrapped = get_peft_model(OldSignatureLlama(new.config), LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_kwarg(wrapped) == "past_key_values"


def test_the_engine_decodes_a_model_of_the_old_signature_as_the_new(models) -> None:
    """Greedy fp32 texts of the old-signature model equal those of the same weights under the
    installed signature, with the shared prompt prefix and without, across refills."""
    tok, new, old = models
    system = {"role": "system", "content": "Answer in your own words, and keep it short please."}
    prompts = [[system, *chat(i)[-1:]] for i in range(12)]
    budgets = [3 + i % 6 for i in range(12)]
    for share in (True, False):
        stats = GenerationStats()
        expected = generate_detailed(new, tok, prompts, max_new_tokens=budgets, batch_size=4, share_prefix=share)
        got = generate_detailed(old, tok, prompts, max_new_tokens=budgets, batch_size=4, share_prefix=share,
                                stats=stats)
        assert got == expected
        assert (stats.shared_prefix_tokens > 0) == share
        assert sum(g.num_tokens for g in got) > len(got)  # decoding steps ran from the cache
