import math

import pytest
import torch
import torch.nn.functional as F

from d2m_export import evaluation
from d2m_export.sources.corpora import load_text, token_windows
from d2m_export.errors import UserError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    """The embedded SmolLM2's tokenizer (built from its GGUF once per session by conftest)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def moe_model(tokenizer):
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return transformers.Qwen2MoeForCausalLM(config).eval()


@torch.inference_mode()
def reference_loglikelihood(model, tokenizer, context, continuation):
    """One request, one forward, no batching or padding."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logprobs[pos - 1, whole[pos]].item() for pos in range(len(ctx), len(whole)))


@pytest.mark.parametrize("task,limit", [("arc_easy", 4), ("winogrande", 3), ("hellaswag", 2), ("mmlu", 3)])
def test_batched_scores_match_unbatched(model, tokenizer, task, limit):
    docs = evaluation.task_docs(task, limit)
    assert len(docs) == limit
    flat = [req for doc in docs for req in doc.requests]
    batched = evaluation.loglikelihoods(model, tokenizer, flat, batch_size=3, progress=False)
    reference = [reference_loglikelihood(model, tokenizer, c, x) for c, x in flat]
    assert batched == pytest.approx(reference, abs=1e-4)

    accs, pos = [], 0
    for doc in docs:
        lls = reference[pos:pos + len(doc.requests)]
        pos += len(doc.requests)
        accs.append(float(max(range(len(lls)), key=lls.__getitem__) == doc.gold))
    result = evaluation.run_task(model, tokenizer, task, limit, batch_size=3, progress=False)
    assert result["n"] == limit
    assert result["acc"] == pytest.approx(sum(accs) / len(accs))


def test_batched_scores_match_unbatched_moe(moe_model, tokenizer):
    flat = [req for doc in evaluation.task_docs("arc_easy", 2) for req in doc.requests]
    batched = evaluation.loglikelihoods(moe_model, tokenizer, flat, batch_size=4, progress=False)
    reference = [reference_loglikelihood(moe_model, tokenizer, c, x) for c, x in flat]
    assert batched == pytest.approx(reference, abs=1e-4)


def test_perplexity_is_exp_mean_nll(model, tokenizer):
    windows = token_windows(tokenizer, load_text("austen"), 32, 128)
    nlls = []
    with torch.inference_mode():
        for w in windows:
            logits = model(w[None]).logits[0, :-1]
            nlls.append(F.cross_entropy(logits, w[1:], reduction="none"))
    expected = math.exp(torch.cat(nlls).mean().item())
    got = evaluation.perplexity(model, tokenizer, "austen", tokens=128, window=32, batch_size=3, progress=False)
    assert got["corpus"] == "austen"
    assert got["tokens"] == 4 * 31
    assert got["value"] == pytest.approx(expected, rel=1e-5)


def test_acc_norm_divides_by_choice_characters():
    doc = evaluation.Doc([("q", " short"), ("q", " a much longer answer")], gold=1, choice_lens=[5, 20])
    assert evaluation.score([-10.0, -12.0], doc) == (0.0, 1.0)


def test_choice_lengths_follow_lm_eval():
    arc = evaluation.task_docs("arc_easy", 1)[0]
    assert arc.choice_lens == [len(x) - 1 for _, x in arc.requests]      # choice text, no leading space
    wino = evaluation.task_docs("winogrande", 1)[0]
    assert len({x for _, x in wino.requests}) == 1                        # partial scoring
    assert wino.choice_lens == [len(c) for c, _ in wino.requests]
    assert wino.gold == 1                                                 # "answer": "2"


def test_encode_pair_moves_trailing_space(tokenizer):
    ctx, cont = evaluation.encode_pair(tokenizer, "Answer: ", "A")
    assert ctx == tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(cont) == " A"


def test_rc_docs_skip_unconditional_requests():
    docs = evaluation.task_docs("arc_easy")
    assert len(docs) == 570
    assert all(c != "Answer:" for doc in docs for c, _ in doc.requests)


def test_mmlu_prompt_and_round_robin():
    docs = evaluation.task_docs("mmlu", 3)
    assert docs[0].requests[0][0].startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert docs[0].requests[0][0].endswith("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert [x for _, x in docs[0].requests] == [" A", " B", " C", " D"]
    assert "about anatomy." in docs[1].requests[0][0] and "about astronomy." in docs[2].requests[0][0]


def test_unknown_task_and_bad_limit_are_user_errors(model, tokenizer):
    assert {"arc_easy", "hellaswag", "piqa", "winogrande", "boolq", "mmlu"} <= set(evaluation.available_tasks())
    with pytest.raises(UserError, match="unknown task.*nope.*available: .*arc_easy"):
        evaluation.evaluate(model, tokenizer, ["arc_easy", "nope"], limit=1, ppl_tokens=0)
    with pytest.raises(UserError, match="limit"):
        evaluation.task_docs("arc_easy", 0)


def test_evaluate_shape(model, tokenizer):
    out = evaluation.evaluate(model, tokenizer, ["piqa"], limit=2, ppl_tokens=512, batch_size=2, progress=False)
    assert out["perplexity"]["tokens"] == 511 and out["perplexity"]["value"] > 1
    assert set(out["tasks"]["piqa"]) == {"acc", "acc_norm", "n"} and out["tasks"]["piqa"]["n"] == 2
    assert evaluation.evaluate(model, tokenizer, [], ppl_tokens=0)["perplexity"] is None
