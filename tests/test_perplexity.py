import math

import torch

from conftest import make_model
from lmprune.evaluation.perplexity import EvalSpec, perplexity, stream_perplexity


def test_stream_perplexity_is_exp_mean_window_loss(tokenizer):
    model = make_model("llama")
    ids = torch.randint(0, 300, (1, 5 * 16 + 7))
    ppl, n, available = stream_perplexity(model, ids, 16, progress=False)
    assert (n, available) == (5, 5)  # the partial window is dropped
    with torch.no_grad():
        losses = [model(ids[:, w * 16:(w + 1) * 16], labels=ids[:, w * 16:(w + 1) * 16]).loss.item() for w in range(5)]
    assert math.isclose(ppl, math.exp(sum(losses) / 5), rel_tol=1e-5)
    capped, n, _ = stream_perplexity(model, ids, 16, max_windows=2, progress=False)
    assert n == 2 and math.isclose(capped, math.exp(sum(losses[:2]) / 2), rel_tol=1e-5)


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_evaluation_text_tokenised_once_per_tokenizer(tokenizer, data_dir):
    model = make_model("llama")
    counting = CountingTokenizer(tokenizer)
    a = perplexity(model, counting, EvalSpec("ptb", 32, 2), data_dir, progress=False)
    b = perplexity(model, counting, EvalSpec("ptb", 32, 2), data_dir, progress=False)
    assert counting.calls == 1 and a.perplexity == b.perplexity and a.windows == 2


def test_batched_windows_give_the_same_perplexity():
    model = make_model("llama")
    ids = torch.randint(0, 300, (1, 7 * 16 + 3))
    one, n1, _ = stream_perplexity(model, ids, 16, progress=False)
    batched, n3, _ = stream_perplexity(model, ids, 16, progress=False, batch_size=3)  # 3 + 3 + 1 windows
    assert n1 == n3 == 7 and math.isclose(one, batched, rel_tol=1e-5)
