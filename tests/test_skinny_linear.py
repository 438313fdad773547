"""Linears on few rows as (W x^T)^T: the same values as `F.linear`, only inside the block, only
fp32 on a CPU; and the engine's greedy text is the same with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import tiny_model, tiny_tokenizer

from fedsdr.generation import generate_detailed
from fedsdr.models.skinny_linear import SKINNY_ROWS, skinny_linear, skinny_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(1, 48), (8, 48), (2, 5, 48), (4, 16, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_equals_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(shape, generator=g), torch.randn(96, 48, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    out = skinny_linear(x, weight, b)
    assert out.shape == (*shape[:-1], 96) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_more_rows_than_the_limit_take_f_linear_itself() -> None:
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(SKINNY_ROWS + 1, 32, generator=g), torch.randn(40, 32, generator=g)
    assert torch.equal(skinny_linear(x, weight), F.linear(x, weight))
    empty = torch.randn(0, 32)
    assert skinny_linear(empty, weight).shape == (0, 40)


def test_the_block_takes_fp32_cpu_linears_and_gives_them_back() -> None:
    model = tiny_model(tiny_tokenizer()).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooked = linears[0]
    hooked.forward = lambda x: F.linear(x, hooked.weight)  # as accelerate's hooks replace it
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with skinny_linears(model) as taken:
            assert taken == len(linears) - 1
            assert all("forward" in vars(m) for m in linears)
            skinny = model(input_ids=ids).logits
    assert all("forward" not in vars(m) for m in linears[1:]) and "forward" in vars(hooked)
    torch.testing.assert_close(skinny, plain, rtol=1e-4, atol=1e-5)
    with skinny_linears(model, 0) as taken:
        assert taken == 0 and all("forward" not in vars(m) for m in linears[1:])
    with skinny_linears(model.to(torch.bfloat16)) as taken:
        assert taken == 0  # not measured in bf16: left to F.linear


class _ScaledLinear(torch.nn.Linear):
    """A linear with its own forward (as quantized linears have): not to be replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_linear_class_with_its_own_forward_is_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), _ScaledLinear(16, 16))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain = model(x)
        with skinny_linears(model) as taken:
            assert taken == 1 and "forward" not in vars(model[1])
            torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-5)


def test_the_engine_gives_the_same_greedy_text_with_and_without_it() -> None:
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    prompts = [[{"role": "user", "content": f"item {i} " * (i % 4 + 1) + "what is 6 times 7?"}] for i in range(12)]
    budgets = [8 + i % 9 for i in range(12)]
    skinny = generate_detailed(model, tok, prompts, max_new_tokens=budgets, batch_size=6)
    plain = generate_detailed(model, tok, prompts, max_new_tokens=budgets, batch_size=6, skinny_rows=0)
    assert skinny == plain
    assert all("forward" not in vars(m) for m in model.modules())
