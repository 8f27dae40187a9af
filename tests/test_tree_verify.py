"""Tree verification: a candidate tree's structure on a hand-made example; one tree verify pass gives, at every
node, the logits the unmodified HF model gives for the prompt followed by that node's path; committing one path
leaves a cache that continues exactly like HF on the path; sessions that cannot verify a tree say why."""

import pytest
import torch

import workbench as wb
from workbench.decode.tree import CandidateTree, best_path
from workbench.run.session import Session

# rows: 0 the root, 1 (0,), 2 (1,), 3 (0, 0), 4 (0, 1), 5 (0, 0, 0)
CHOICES = [(0, 0), (1,), (0,), (0, 1), (0, 0, 0)]


def test_the_tree_of_a_hand_made_choice_list():
    tree = CandidateTree.of(CHOICES, heads=3)
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))  # breadth-first
    assert tree.parents == [0, 0, 1, 1, 3]
    assert tree.depths == [0, 1, 1, 2, 2, 3]
    assert tree.paths == [[2], [1, 4], [1, 3, 5]]
    assert tree.ranks() == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert tree.widest() == 2 and tree.depth == 3 and tree.size == 5
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 0, 1, 0, 0, 0],
                             [1, 1, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],
                             [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(tree.ancestors(), expected)


def test_best_path_keeps_the_most_nodes_and_breaks_ties_by_score():
    tree = CandidateTree.of(CHOICES, heads=3)
    accepted = torch.tensor([False, True, True, True, False, False])
    assert best_path(tree, accepted) == [1, 3]  # rows 1 and 3 pass, row 5 does not
    assert best_path(tree, torch.tensor([False, False, True, False, False, False])) == [2]
    assert best_path(tree, torch.zeros(6, dtype=torch.bool)) == []
    tie = torch.tensor([False, True, True, True, True, False])  # paths [1, 4] and [1, 3] both keep 2
    assert best_path(tree, tie) == [1, 4]  # the first in tree order
    score = torch.tensor([0.0, -1.0, -1.0, -3.0, -2.0, 0.0])
    assert best_path(tree, tie, score) == [1, 4]
    assert best_path(tree, tie, torch.tensor([0.0, -1.0, -1.0, -1.0, -2.0, 0.0])) == [1, 3]


def test_bad_trees_are_refused():
    with pytest.raises(wb.ParameterError, match=r"tree node \(1, 0\) has no parent \(1,\)"):
        CandidateTree.of([(0,), (1, 0)], heads=3)
    with pytest.raises(wb.ParameterError, match="is 3 deep; the heads give 2 levels"):
        CandidateTree.of([(0,), (0, 0), (0, 0, 0)], heads=2)
    with pytest.raises(wb.ParameterError, match="list of tuples"):
        CandidateTree.of([("a",)], heads=2)


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash"])
def test_a_tree_pass_gives_each_node_the_logits_of_its_own_path(tiny_llama, attention):
    tree = CandidateTree.of(CHOICES, heads=3)
    prompt = torch.randint(5, 200, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = [11, 12, 13, 14, 15, 16]  # the root, then one token per node
    with Session(tiny_llama, "full", attention) as session:
        session.feed(prompt, "prefill")
        rows = session.feed(tokens, "verify", tree=tree)
        assert session.position == len(prompt) + len(tokens)
    for row in range(len(tokens)):
        path = [r for r in range(len(tokens)) if tree.ancestors()[row, r]]  # the root and the node's ancestors
        expected = hf_last_logits(tiny_llama, prompt + [tokens[r] for r in path])
        torch.testing.assert_close(rows[row], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache", ["full", "snapkv"])
def test_committing_a_path_continues_like_the_model_on_that_path(tiny_llama, cache):
    policy = "full" if cache == "full" else wb.cache.get("snapkv", budget=16, window=4)
    tree = CandidateTree.of(CHOICES, heads=3)
    prompt = torch.randint(5, 200, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens = [21, 22, 23, 24, 25, 26]
    with Session(tiny_llama, policy, "sdpa") as session:
        session.feed(prompt, "prefill")
        session.feed(tokens, "verify", tree=tree)
        session.commit(3, rows=[0, 1, 4])  # the root and the path (0,) -> (0, 1)
        assert session.committed == session.position == len(prompt) + 3
        assert [p.tolist() for p in session.cache.positions(0)][0][-3:] == [24, 25, 26]
        after = session.feed([7], "decode")[-1]
    with Session(tiny_llama, policy, "sdpa") as reference:  # the same cache policy, fed the path token by token
        reference.feed(prompt, "prefill")
        for token in [21, 22, 25, 7]:
            expected = reference.feed([token], "decode")[-1]
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    if cache == "full":
        torch.testing.assert_close(after, hf_last_logits(tiny_llama, prompt + [21, 22, 25, 7]),
                                   rtol=1e-4, atol=1e-4)


def test_sessions_that_cannot_verify_a_tree_say_why(tiny_llama):
    tree = CandidateTree.of(CHOICES, heads=3)
    with Session(tiny_llama, wb.cache.get("h2o", budget=16), "sdpa") as session:
        assert not session.takes_tree
        session.feed(list(range(5, 30)), "prefill")
        with pytest.raises(wb.WorkbenchError, match="cannot verify a tree"):
            session.feed([1, 2, 3, 4, 5, 6], "verify", tree=tree)
    with Session(tiny_llama, "full", "sliding_window") as session:
        assert not session.takes_tree
    with Session(tiny_llama, "full", "sdpa") as session:
        session.feed(list(range(5, 30)), "prefill")
        with pytest.raises(wb.WorkbenchError, match="fed as 6 tokens"):
            session.feed([1, 2, 3], "verify", tree=tree)
        session.feed([1, 2, 3, 4, 5, 6], "verify", tree=tree)
        with pytest.raises(wb.WorkbenchError, match="ascending offsets"):
            session.commit(2, rows=[1, 2])
