import jax
import jax.numpy as jnp
import numpy as np

from jsft.evals import generate, metrics
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef

jax.config.update("jax_default_matmul_precision", "float32")


def _argmax_by_full_forwards(model, params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(model.apply(params, jnp.array([seq]))[0, -1])))
    return seq[len(prompt) :]


def test_greedy_batch_of_mixed_lengths_equals_one_prompt_at_a_time():
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=50))
    params = model.init(jax.random.key(0))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    eos = 49  # chosen so that the random model (almost surely) does not stop early
    decoder = generate.make_greedy_decoder(model, 5, stop_ids=[eos], pad_id=0)
    out = generate.greedy_generate(decoder, params, prompts, 16, 5, batch_size=4, stop_ids=[eos], pad_id=0)
    for p, o in zip(prompts, out, strict=True):
        ref = _argmax_by_full_forwards(model, params, p, 5)
        if eos in ref:
            ref = ref[: ref.index(eos)]
        assert o == ref


def test_generation_stops_at_eos():
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=50))
    params = model.init(jax.random.key(0))
    first = _argmax_by_full_forwards(model, params, [5, 6], 1)[0]
    decoder = generate.make_greedy_decoder(model, 5, stop_ids=[48, first], pad_id=0)
    assert generate.greedy_generate(decoder, params, [[5, 6]], 8, 5, 1, [48, first], 0) == [[]]


def test_exact_match_ignores_only_whitespace_differences():
    assert metrics.exact_match(" C  A T ", "C A T") == 1.0
    assert metrics.exact_match("c a t", "C A T") == 0.0
    np.testing.assert_equal(metrics.exact_match("", ""), 1.0)
