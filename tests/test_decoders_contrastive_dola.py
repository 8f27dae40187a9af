"""Contrastive search and DoLa against references written here from the papers' formulas with plain transformers
forwards (no cache, the whole sequence recomputed each step); DoLa's layer choice on hand-made distributions;
both run with full and evicting caches; bad parameters are refused."""

import math

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.decode.dola import candidate_layers, select_premature

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llama():
    return wb.tiny("llama")


@pytest.fixture(scope="module")
def llama4():
    return wb.tiny("llama", num_hidden_layers=4)


def run(model, decoder, n, prompt=PROMPT, cache="full"):
    return wb.generate(model, prompt, decoder=decoder, cache=cache, max_new_tokens=n, ignore_eos=True)


# -- contrastive search -----------------------------------------------------------------------------------------
def reference_contrastive(model, steps, alpha, k):
    """SimCTG: score(v) = (1 - alpha) p(v) - alpha max_j cos(h_v, h_j) over the top-k v; no cache."""
    hf, sequence = model.hf, model.encode(PROMPT)[0].tolist()
    with torch.no_grad():
        for _ in range(steps):
            out = hf(input_ids=torch.tensor([sequence]), output_hidden_states=True)
            context = out.hidden_states[-1][0]  # (t, hidden): every previous token's last hidden state
            p = torch.softmax(out.logits[0, -1].float(), -1)
            top_p, top_v = p.topk(k)
            scores = []
            for pv, v in zip(top_p.tolist(), top_v.tolist()):
                h_v = hf(input_ids=torch.tensor([sequence + [v]]), output_hidden_states=True).hidden_states[-1][0, -1]
                penalty = max(float(F.cosine_similarity(h_v, h_j, dim=0)) for h_j in context)
                scores.append((1 - alpha) * pv - alpha * penalty)
            sequence.append(top_v[max(range(k), key=scores.__getitem__)].item())
    return sequence[-steps:]


@pytest.mark.parametrize("alpha,k", [(0.6, 4), (0.9, 3)])
def test_contrastive_matches_a_cacheless_reference(llama, alpha, k):
    tokens = run(llama, wb.decode.get("contrastive", penalty_alpha=alpha, top_k=k), 12).token_ids
    assert tokens == reference_contrastive(llama, 12, alpha, k)
    assert tokens != run(llama, "greedy", 12).token_ids  # the penalty changed the choice somewhere


def test_contrastive_with_alpha_zero_is_greedy(llama):
    assert run(llama, wb.decode.get("contrastive", penalty_alpha=0.0), 12).token_ids == run(llama, "greedy",
                                                                                             12).token_ids


# -- DoLa -------------------------------------------------------------------------------------------------------
def reference_dola(model, steps, layers, alpha=0.1, penalty=1.0):
    """DoLa: the premature layer j of max JSD(p_final, q_j), q_j = softmax(lm_head(norm(h_j))); greedy on
    log p - log q_j over {v: p(v) >= alpha max p}; transformers' repetition penalty on those scores; no cache."""
    hf, sequence = model.hf, model.encode(PROMPT)[0].tolist()
    with torch.no_grad():
        for _ in range(steps):
            out = hf(input_ids=torch.tensor([sequence]), output_hidden_states=True)
            p = torch.softmax(out.logits[0, -1].float(), -1)
            best, best_jsd = None, -1.0
            for j in layers:
                q = torch.softmax(hf.lm_head(hf.model.norm(out.hidden_states[j][0, -1])).float(), -1)
                m = (p + q) / 2
                jsd = 0.5 * float((p * (p.log() - m.log())).sum()) + 0.5 * float((q * (q.log() - m.log())).sum())
                if jsd > best_jsd:
                    best, best_jsd = q, jsd
            scores = torch.where(p >= alpha * p.max(), p.log() - best.log(), torch.tensor(-math.inf))
            for v in set(sequence):
                scores[v] = scores[v] * penalty if scores[v] < 0 else scores[v] / penalty
            sequence.append(int(scores.argmax()))
    return sequence[-steps:]


@pytest.mark.parametrize("layers,params", [
    ("0,1,2,3", {}),
    ("1,2,3", {}),  # the chosen layer changes within the 10 steps (see the test below)
    ("high", {}),  # 4 layers, untied head: [2]
    ("low", {"alpha": 0.3}),  # [0]
    ("1,3", {"repetition_penalty": 1.2}),
])
def test_dola_matches_a_cacheless_reference(llama4, layers, params):
    tokens = run(llama4, wb.decode.get("dola", dola_layers=layers, **params), 10).token_ids
    explicit = candidate_layers(layers, 4)
    assert tokens == reference_dola(llama4, 10, explicit, params.get("alpha", 0.1),
                                    params.get("repetition_penalty", 1.0))
    assert tokens != run(llama4, "greedy", 10).token_ids  # the contrast changed the choice somewhere


def test_dola_changes_its_premature_layer_from_step_to_step(llama4, monkeypatch):
    import workbench.decode.dola as dola

    chosen, select = [], dola.select_premature
    monkeypatch.setattr(dola, "select_premature", lambda final, premature: chosen.append(select(final, premature))
                        or chosen[-1])
    run(llama4, wb.decode.get("dola", dola_layers="1,2,3"), 10)
    assert len(chosen) == 10 and len(set(chosen)) > 1


def test_dola_selects_the_layer_of_largest_jensen_shannon_divergence():
    p = torch.tensor([0.2, 0.55, 0.25])
    near, far = torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.9, 0.05, 0.05])
    assert select_premature(p.log(), torch.stack([near, far]).log()) == 1
    assert select_premature(p.log(), torch.stack([far, near, p]).log()) == 0
    # here the paper's JSD, 0.5 KL(p||m) + 0.5 KL(q||m), and the reversed form transformers computed,
    # 0.5 KL(m||p) + 0.5 KL(m||q), disagree: the first picks q1 (0.340 > 0.323), the second q2 (0.541 < 0.569)
    p = torch.tensor([0.22, 0.54, 0.24])
    q1, q2 = torch.tensor([0.966, 0.016, 0.018]), torch.tensor([0.001, 0.035, 0.964])

    def kl(a, b):
        return float((a * (a.log() - b.log())).sum())

    jsd = [0.5 * kl(p, (p + q) / 2) + 0.5 * kl(q, (p + q) / 2) for q in (q1, q2)]
    reversed_form = [0.5 * kl((p + q) / 2, p) + 0.5 * kl((p + q) / 2, q) for q in (q1, q2)]
    assert jsd[0] > jsd[1] and reversed_form[0] < reversed_form[1]
    assert select_premature(p.log(), torch.stack([q1, q2]).log()) == 0


def test_candidate_layers_follow_transformers_buckets():
    assert (candidate_layers("low", 4), candidate_layers("high", 4)) == ([0], [2])
    assert candidate_layers("low", 32) == list(range(0, 16, 2))
    assert candidate_layers("low", 32, tied=True) == list(range(2, 16, 2))
    assert candidate_layers("high", 32) == list(range(16, 32, 2))
    assert candidate_layers("low", 2, tied=True) == [1]
    assert (candidate_layers("low", 48), candidate_layers("high", 48)) == (list(range(0, 20, 2)),
                                                                          list(range(28, 48, 2)))
    assert candidate_layers(" 3, 0 ", 4) == [3, 0]
    with pytest.raises(wb.ParameterError, match="names layer 4, but the model's premature layers are 0..3"):
        candidate_layers("1,4", 4)


# -- both: caches, parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["contrastive", "dola"])
def test_runs_with_full_and_evicting_caches(llama4, name):
    prompt = " ".join([PROMPT] * 4)  # 76 tokens: more than the budget from the prefill on
    full = run(llama4, name, 16, prompt)
    evicting = run(llama4, name, 16, prompt, wb.cache.get("h2o", budget=64))
    assert len(full.token_ids) == len(evicting.token_ids) == 16
    assert evicting.held_cache_bytes < full.held_cache_bytes  # it did evict


@pytest.mark.parametrize("name,params,message", [
    ("contrastive", {"penalty_alpha": 1.5}, "'penalty_alpha' is 1.5; it must be <= 1.0"),
    ("contrastive", {"top_k": 0}, "'top_k' is 0; it must be >= 1"),
    ("dola", {"dola_layers": "middle"}, "'dola_layers' must be 'low', 'high' or comma-separated layer indices"),
    ("dola", {"dola_layers": "1,1"}, "'dola_layers' needs distinct layer indices >= 0"),
    ("dola", {"dola_layers": "-2"}, "'dola_layers' needs distinct layer indices >= 0"),
    ("dola", {"alpha": -0.1}, "'alpha' is -0.1; it must be >= 0.0"),
    ("dola", {"repetition_penalty": 0.5}, "'repetition_penalty' is 0.5; it must be >= 1.0"),
])
def test_bad_parameters_are_refused(name, params, message):
    with pytest.raises(wb.ParameterError, match=message):
        wb.decode.get(name, **params)


def test_a_layer_beyond_the_model_is_refused_when_run(llama4):
    with pytest.raises(wb.ParameterError, match="names layer 9"):
        run(llama4, wb.decode.get("dola", dola_layers="1,9"), 2)


def test_describe_names_the_papers():
    assert "Su, Lan" in wb.decode.describe("contrastive") and "penalty_alpha = 0.6" in wb.decode.describe("contrastive")
    text = wb.decode.describe("dola")
    assert "ICLR 2024" in text and "repetition_penalty is off by default" in text
