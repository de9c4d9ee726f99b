"""MBC: tasks grouped by the cosine similarity of their flattened LoRA parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig

from tclora.clustering import (
    mbc_clusters,
    mbc_similarity,
    mbc_vectors,
    read_adapter_folders,
    read_mbc_assignments,
    write_mbc_assignments,
)
from tclora.merge import AdapterStack

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def _factors(gen: torch.Generator, r: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        m: (torch.randn(r, 8, generator=gen), torch.randn(6, r, generator=gen)) for m in MODULES
    }


def _stack() -> AdapterStack:
    """Four tasks: t0 ≈ t2 and t1 ≈ t3 (1% noise), the two pairs unrelated."""
    gen = torch.Generator().manual_seed(0)
    first, second = _factors(gen), _factors(gen)
    base = {"t0": first, "t1": second, "t2": first, "t3": second}
    weights: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {m: [] for m in MODULES}
    for task in ["t0", "t1", "t2", "t3"]:
        for m in MODULES:
            a, b = base[task][m]
            noise = _factors(gen)[m]
            weights[m].append((a + 0.01 * noise[0], b + 0.01 * noise[1], 2.0))
    return AdapterStack(["t0", "t1", "t2", "t3"], MODULES, LoraConfig(r=2), weights)


def test_two_pairs_of_near_equal_adapters_give_exactly_two_clusters() -> None:
    stack = _stack()
    tasks, vectors = mbc_vectors(stack)
    assert tasks == ["t0", "t1", "t2", "t3"]
    # per module (sorted): A (2x8) then B (6x2), raw factors, unscaled
    assert vectors.shape == (4, 2 * (16 + 12))
    a0, b0, _ = stack.factors(MODULES[0])[1]
    np.testing.assert_allclose(vectors[1, :16], a0.numpy().ravel(), rtol=1e-6)
    np.testing.assert_allclose(vectors[1, 16:28], b0.numpy().ravel(), rtol=1e-6)
    sim = mbc_similarity(vectors)
    assert sim[0, 2] > 0.999 and sim[1, 3] > 0.999
    assert abs(sim[0, 1]) < 0.5 and np.allclose(np.diag(sim), 1.0)

    groups = mbc_clusters(stack, 2, seed=0)
    assert groups == {"t0": 0, "t1": 1, "t2": 0, "t3": 1}
    assert mbc_clusters(stack, 2, seed=7) == groups  # any seed: the pairs are unmistakable
    assert mbc_clusters(stack, 1) == {"t0": 0, "t1": 0, "t2": 0, "t3": 0}
    four = mbc_clusters(stack, 4)
    assert sorted(four.values()) == [0, 1, 2, 3] and four["t0"] == 0

    # the same from flattened parameter dicts (e.g. adapter_model.safetensors entries)
    params = {
        task: {
            f"{m}.lora_{which}.weight": f[k]
            for m in MODULES
            for k, which in ((0, "A"), (1, "B"))
            for f in [stack.factors(m)[t]]
        }
        for t, task in enumerate(stack.names)
    }
    assert mbc_clusters(params, 2, seed=0) == groups


def test_mbc_errors() -> None:
    stack = _stack()
    with pytest.raises(
        ValueError,
        match=r"num_clusters=5: MBC groups 4 tasks \['t0', 't1', 't2', 't3'\], so at most 4 "
        r"clusters; train more tasks in stage 1 or lower num_clusters",
    ):
        mbc_clusters(stack, 5)
    with pytest.raises(ValueError, match=r"num_clusters=0: must be an integer >= 1"):
        mbc_clusters(stack, 0)
    same = {t: {"w": np.ones(3)} for t in ["a", "b", "c"]}
    with pytest.raises(
        ValueError,
        match=r"num_clusters=2: the 3 tasks. adapters form only 1 distinct groups \(identical "
        r"similarity profiles\); lower num_clusters",
    ):
        mbc_clusters(same, 2)
    with pytest.raises(ValueError, match=r"adapters=\{\}: MBC needs one or more tasks"):
        mbc_clusters({}, 1)
    with pytest.raises(
        ValueError,
        match=r"adapters\['b'\] has parameters \['v'\]\.\.\. \(1\); adapters\['a'\] has "
        r"\['w'\]\.\.\. \(1\): every task needs the same LoRA parameters",
    ):
        mbc_vectors({"a": {"w": np.ones(2)}, "b": {"v": np.ones(2)}})
    with pytest.raises(
        ValueError,
        match=r"task 'b' has a parameter of shape \(3,\) where task 'a' has \(2,\): MBC compares "
        r"flattened parameters",
    ):
        mbc_vectors({"a": {"w": np.ones(2)}, "b": {"w": np.ones(3)}})
    with pytest.raises(
        ValueError, match=r"the LoRA parameters of \['b'\] are all zero; their cosine similarity"
    ):
        mbc_vectors({"a": {"w": np.ones(2)}, "b": {"w": np.zeros(2)}})


def test_stage_two_from_saved_adapter_folders(tmp_path: Path) -> None:
    """Stage 1's folders (peft ``save_pretrained``) → stage 2's groups; a missing one is named."""
    from helpers import build_tiny_llama
    from peft import get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_llama(64), config, adapter_name="t0")
    for name in ["t1", "t2", "t3"]:
        model.add_adapter(name, config)
    with torch.no_grad():  # t2 = t0 and t3 = t1, up to 1% noise
        for pname, param in model.named_parameters():
            for copy, source in (("t2", "t0"), ("t3", "t1")):
                if f".{copy}." in pname:
                    original = model.get_parameter(pname.replace(f".{copy}.", f".{source}."))
                    param.copy_(original + 0.01 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path), selected_adapters=["t0", "t1", "t2", "t3"])
    folders = {task: tmp_path / task for task in ["t0", "t1", "t2", "t3"]}
    adapters = read_adapter_folders(folders)
    assert len(adapters["t0"]) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".lora_A." in k or ".lora_B." in k for k in adapters["t0"])
    groups = mbc_clusters(adapters, 2)
    assert groups == {"t0": 0, "t1": 1, "t2": 0, "t3": 1}
    path = write_mbc_assignments(tmp_path / "mbc.json", groups)
    assert read_mbc_assignments(path) == groups

    with pytest.raises(
        ValueError,
        match=r"folders\['t9'\]='.*absent': no adapter_model\.safetensors there; the stage-1 "
        r"adapter of this task is missing",
    ):
        read_adapter_folders({**folders, "t9": tmp_path / "absent"})
    with pytest.raises(ValueError, match=r"folders=\{\}: give \{task: stage-1 adapter folder\}"):
        read_adapter_folders({})


def test_text_vs_mbc_figure_shows_both_clusterings_and_the_similarity() -> None:
    from benchmarks.text_vs_mbc import figure
    from tclora.clustering import cluster_statistics

    tasks = ["a", "a", "b", "b", "c", "c"]
    text = np.array([0, 0, 0, 1, 1, 1])
    mbc = np.array([0, 0, 0, 0, 1, 1])
    stats = {"text": cluster_statistics(text, tasks), "MBC": cluster_statistics(mbc, tasks)}
    similarity = {"tasks": ["a", "b", "c"], "cosine": np.eye(3).tolist(), "groups": [0, 0, 1]}
    fig = figure(["a", "b", "c"], stats, similarity)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == f"text: purity {stats['text']['purity']:.2f}, ARI " + (
        f"{stats['text']['adjusted_rand_index']:.2f}"
    )
    assert titles[1].startswith("MBC: purity 0.67")  # {a, b} share a group: 4 of 6 in majority
    assert titles[2] == "MBC: cosine of the tasks' LoRA parameters"
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["a (g0)", "b (g0)", "c (g1)"]
