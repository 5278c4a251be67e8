"""``m3bsr experiment`` and ``m3bsr report``: each experiment end to end on a tiny dataset with tiny runs
(one epoch, hidden size 8), run reuse on a second call, and the assembled report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny_prepared
from m3bsr.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--set", "train.max_epochs=1", "--set", "model.hidden_size=8", "--set", "train.device=cpu",
        "--set", "model.n_layers=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_prepared(tmp_path_factory.mktemp("data") / "tiny", n_users=24, n_items=40)


def experiment(name, data, out, *extra):
    code = cli_main(["experiment", name, "--dataset", str(data), "--out", str(out), "--quiet", *TINY, *extra])
    assert code == 0
    return pd.read_csv(out / "results.csv")


def check_outputs(out, name):
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / f"{name}.md").read_text()
    assert f"![{name}]({name}.png)" in md
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["name"] == name
    return md, meta


def test_ablation_end_to_end_then_reuses_its_runs(tiny, tmp_path, capsys):
    out = tmp_path / "abl"
    table = experiment("ablation", tiny, out, "--seeds", "0", "--set", "ablation.switches=[no_meie]",
                       "--variants", "fusion=gate")
    entries = ["m3bsr@paper", "m3bsr@paper+no_meie=true", "m3bsr@paper+fusion=gate"]
    assert sorted(table["model"].unique()) == sorted(entries)
    assert len(table) == 3 * 2 * 2  # entries x splits x protocols
    assert not table["NDCG@10"].isna().any()
    md, meta = check_outputs(out, "ablation")
    assert meta["entries"] == entries
    assert "removing MEIE hurts most (full)" in md and "every removal hurts (sampled)" in md
    assert all(c["held"] in (True, False) for c in meta["claims"])
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    again = experiment("ablation", tiny, out, "--seeds", "0", "--set", "ablation.switches=[no_meie]",
                       "--variants", "fusion=gate")
    assert "3 runs done" in (said := capsys.readouterr().out) and "(0 trained, 3 reused)" in said
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")} == mtimes  # nothing retrained
    pd.testing.assert_frame_equal(table, again)


def test_ablation_leaves_out_content_switches_on_data_without_content(tmp_path, capsys):
    bare = make_tiny_prepared(tmp_path / "bare", n_users=24, n_items=40, dims={})
    out = tmp_path / "abl"
    table = experiment("ablation", bare, out, "--seeds", "0", "--set", "ablation.switches=[no_cdmd_m,no_meie]",
                       "--variants", "modality_denoiser=mlp")
    # without content CDMD-M is never built: both content entries would train the full model again
    assert sorted(table["model"].unique()) == ["m3bsr@paper", "m3bsr@paper+no_meie=true"]
    said = capsys.readouterr().out.splitlines()
    for left in ("m3bsr@paper+no_cdmd_m=true", "m3bsr@paper+modality_denoiser=mlp"):
        assert (f"experiment ablation: {left} left out: {bare} has no content features, so it trains the same "
                "model as m3bsr@paper") in said
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["m3bsr@paper+no_meie=true-s0", "m3bsr@paper-s0"]
    # with content the same switches are ablations of their own
    from m3bsr.experiments.base import parse_entries, without_content_switches
    ents = parse_entries("m3bsr@paper,m3bsr@paper+no_cdmd_m=true")
    assert without_content_switches(ents, make_tiny_prepared(tmp_path / "rich", n_users=24, n_items=40),
                                    print) == ents


def test_ablation_claims_are_computed_from_the_numbers():
    from m3bsr.experiments.ablation import claims

    idx = pd.MultiIndex.from_product([["sampled", "full"], ["base", "base+no_meie=true", "base+no_cdmd_m=true"]])
    mean = pd.DataFrame({"NDCG@10": [0.30, 0.20, 0.25] * 2}, index=idx)
    got = {c["claim"]: c["held"] for c in claims(mean, "base", ["base+no_meie=true", "base+no_cdmd_m=true"])}
    assert got == {"every removal hurts (sampled)": True, "removing MEIE hurts most (sampled)": True,
                   "every removal hurts (full)": True, "removing MEIE hurts most (full)": True}
    mean.loc[("full", "base+no_cdmd_m=true"), "NDCG@10"] = 0.10  # the largest drop is now CDMD-M ...
    mean.loc[("sampled", "base+no_cdmd_m=true"), "NDCG@10"] = 0.31  # ... and here a removal helps
    got = {c["claim"]: c["held"] for c in claims(mean, "base", ["base+no_meie=true", "base+no_cdmd_m=true"])}
    assert got["removing MEIE hurts most (full)"] is False and got["every removal hurts (sampled)"] is False
    assert got["every removal hurts (full)"] is True


def test_bad_entries_and_settings_are_one_line_errors(tiny, tmp_path, capsys):
    base = ["experiment", "ablation", "--dataset", str(tiny), "--out", str(tmp_path / "x")]
    assert cli_main(base + ["--models", "nosuch"]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err
    assert cli_main(base + ["--set", "ablation.nosuch=1"]) == 2
    assert "ablation.nosuch" in capsys.readouterr().err
    assert cli_main(base + ["--variants", "nosuchkey=1", *TINY]) == 2
    assert "nosuchkey" in capsys.readouterr().err


def test_report_embeds_every_figure_and_links_them_in_markdown(tmp_path, capsys):
    dirs = []
    for name in ("ablation", "noise"):  # two hand-made sections, one with two figures
        d = tmp_path / name
        d.mkdir()
        png = b"\x89PNG\r\n\x1a\n" + name.encode()
        (d / f"{name}.png").write_bytes(png)
        extra = ""
        if name == "noise":
            (d / "noise_swap.png").write_bytes(png + b"2")
            extra = "![swap](noise_swap.png)\n"
        (d / f"{name}.md").write_text(f"## {name}\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![{name}]({name}.png)\n{extra}")
        (d / "experiment.json").write_text(json.dumps({"name": name}))
        dirs.append(d)
    out = tmp_path / "rep" / "report"
    assert cli_main(["report", *map(str, dirs), "--out", str(out)]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    import base64

    for d, files in zip(dirs, (["ablation.png"], ["noise.png", "noise_swap.png"])):
        for f in files:
            assert f"data:image/png;base64,{base64.b64encode((d / f).read_bytes()).decode()}" in page
    assert page.count("<img") == 3 and page.count("<table>") == 2
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "](../ablation/ablation.png)" in md and "](../noise/noise_swap.png)" in md
    assert cli_main(["report", str(tmp_path), "--out", str(out)]) == 2
    assert "no experiment.json" in capsys.readouterr().err


def test_report_names_each_sections_dataset_and_counts_its_claims(tmp_path):
    dirs = []
    for folder, data, verdicts in (("a", "data/synthetic", [True, False, None]), ("b", "data/ml100k_mm", [True]),
                                   ("c", "/x/ml100k_mm", [])):
        d = tmp_path / folder
        d.mkdir()
        (d / "ablation.md").write_text("## Ablation (paper Figure 3)\n\ntext\n")
        claims = [{"claim": f"c{i}", "held": v, "evidence": ""} for i, v in enumerate(verdicts)]
        (d / "experiment.json").write_text(json.dumps({"name": "ablation", "dataset": data, "claims": claims}))
        dirs.append(d)
    out = tmp_path / "report"
    assert cli_main(["report", *map(str, dirs), "--out", str(out)]) == 0
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    # two sections on one dataset: their folders tell them apart
    assert heads == ["## Ablation (paper Figure 3): synthetic", "## Ablation (paper Figure 3): ml100k_mm (b)",
                     "## Ablation (paper Figure 3): ml100k_mm (c)"]
    # one distinct id per section, each linked from the contents list with its claim count
    assert "1. [Ablation (paper Figure 3): synthetic](#ablation-synthetic) (1 of 2 held)" in md
    assert "2. [Ablation (paper Figure 3): ml100k_mm (b)](#ablation-ml100k-mm) (1 of 1 held)" in md
    assert "3. [Ablation (paper Figure 3): ml100k_mm (c)](#ablation-ml100k-mm-2)\n" in md
    for a in ("ablation-synthetic", "ablation-ml100k-mm", "ablation-ml100k-mm-2"):
        assert md.count(f'<a id="{a}"></a>') == 1 and page.count(f'<section id="{a}">') == 1
        assert f'href="#{a}"' in page


def test_noise_trains_every_model_at_every_level_on_noisy_copies(tiny, tmp_path):
    out = tmp_path / "noise"
    table = experiment("noise", tiny, out, "--seeds", "0", "--models", "m3bsr,pop",
                       "--set", "noise.kinds=[clicks,swap]", "--set", "noise.clicks=[0,0.5]",
                       "--set", "noise.swap=[0,0.5]")
    test = table[(table["split"] == "test")]
    assert sorted(set(zip(test["kind"], test["level"]))) == [("clicks", 0.0), ("clicks", 0.5), ("swap", 0.0),
                                                             ("swap", 0.5)]
    assert set(test["model"]) == {"m3bsr", "pop"} and not test["NDCG@10"].isna().any()
    # level 0 is the clean data, trained once and shared; each noisy level is its own prepared copy
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["clean", "clicks-0.5", "swap-0.5"]
    noisy = json.loads((out / "data" / "clicks-0.5" / "manifest.json").read_text())["noise"]
    assert noisy["kind"] == "clicks" and noisy["level"] == 0.5 and noisy["changed"] > 0
    cfg = (out / "runs" / "swap-0.5" / "pop-s0" / "config.yaml").read_text()
    assert str((out / "data" / "swap-0.5").resolve()) in cfg
    md, meta = check_outputs(out, "noise")
    assert "M3BSR falls slowest under clicks noise (full)" in md
    clean = test[test["level"] == 0].groupby(["model", "protocol"])["NDCG@10"].nunique()
    assert (clean == 1).all()  # the clean runs are shared by both kinds


def test_noise_on_data_without_content_trains_no_content_switch(tmp_path, capsys):
    bare = make_tiny_prepared(tmp_path / "bare", n_users=24, n_items=40, dims={})
    table = experiment("noise", bare, tmp_path / "noise", "--seeds", "0",
                       "--models", "m3bsr@paper,m3bsr@paper+no_cdmd_m=true", "--set", "noise.kinds=[clicks]",
                       "--set", "noise.clicks=[0,0.5]")
    assert set(table["model"]) == {"m3bsr@paper"}
    assert any(line.startswith("experiment noise: m3bsr@paper+no_cdmd_m=true left out: ")
               for line in capsys.readouterr().out.splitlines())


def test_coldstart_splits_users_by_training_interactions(tiny, tmp_path):
    from m3bsr.experiments.coldstart import training_interactions
    from m3bsr.data.prepared import PreparedDataset

    n = training_interactions(tiny)
    ds = PreparedDataset.load(tiny)
    valid_order = dict(zip(ds.valid.user, ds.valid.order))
    u = int(ds.users["user"].iloc[0])
    assert n[u] == int((ds.events[ds.events["user"] == u]["order"] < valid_order[u]).sum())
    cut = int(n.median())
    out = tmp_path / "cold"
    table = experiment("coldstart", tiny, out, "--seeds", "0", "--models", "m3bsr,pop",
                       "--set", f"coldstart.max_train={cut}")
    cold = table[table["group"] == "cold"]
    assert set(cold["users"]) == {int((n <= cut).sum())} and set(table[table["group"] == "all"]["users"]) == {len(n)}
    md, meta = check_outputs(out, "coldstart")
    assert meta["cold_users"] == int((n <= cut).sum()) and "M3BSR is best on cold-start users (full)" in md
    # a second call on another output folder reuses the runs of the first (as of a compare --out)
    again = experiment("coldstart", tiny, tmp_path / "cold2", "--seeds", "0", "--models", "m3bsr,pop",
                       "--set", f"coldstart.max_train={cut}", "--set", f"coldstart.runs={out}")
    assert not (tmp_path / "cold2" / "runs").exists()
    pd.testing.assert_frame_equal(table, again)


def test_sensitivity_heat_map_cells_and_shared_default_cell(tiny, tmp_path):
    out = tmp_path / "sens"
    table = experiment("sensitivity", tiny, out, "--seeds", "0", "--set",
                       'sensitivity.grids={a: "T_b=5,10 lambda_b=0.02", b: "tau=0.3 lambda_c=0.05,0.1"}')
    assert sorted(p.name for p in (out / "runs").iterdir()) == [  # the default cell is trained once
        "m3bsr@paper+T_b=5-s0", "m3bsr@paper+lambda_c=0.1-s0", "m3bsr@paper-s0"]
    assert len(table) == 4 and set(table["split"]) == {"valid"}
    base = table[table["entry"] == "m3bsr@paper"]["NDCG@10"]
    assert base.nunique() == 1 and len(base) == 2
    md, meta = check_outputs(out, "sensitivity")
    assert sum(c["claim"].endswith("across the grid") for c in meta["claims"]) == 2


def test_sensitivity_on_data_without_content_leaves_out_the_cdmd_m_grid(tmp_path, capsys):
    bare = make_tiny_prepared(tmp_path / "bare", n_users=24, n_items=40, dims={})
    out = tmp_path / "sens"
    table = experiment("sensitivity", bare, out, "--seeds", "0", "--set",
                       'sensitivity.grids={a: "T_b=5,10 lambda_b=0.02", m: "T_m=5,10 lambda_m=0.02"}')
    # without content CDMD-M is never built: T_m and lambda_m change nothing, so grid m is not trained
    assert set(table["grid"]) == {"a"}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["m3bsr@paper+T_b=5-s0", "m3bsr@paper-s0"]
    assert (f"experiment sensitivity: grid m left out: T_m and lambda_m change nothing in m3bsr@paper on {bare} "
            "(no content features, so no CDMD-M), so every cell would train it again"
            ) in capsys.readouterr().out.splitlines()
    code = cli_main(["experiment", "sensitivity", "--dataset", str(bare), "--out", str(tmp_path / "none"), *TINY,
                     "--set", 'sensitivity.grids={m: "T_m=5,10 lambda_m=0.02"}'])
    assert code == 2 and "every grid varies keys that change nothing in this model" in capsys.readouterr().err


def test_sensitivity_of_the_default_preset_refuses_the_papers_grids(tiny, tmp_path, capsys):
    # the default preset builds no specific experts, so none of the paper's six keys changes it
    code = cli_main(["experiment", "sensitivity", "--dataset", str(tiny), "--out", str(tmp_path / "s"), *TINY,
                     "--models", "m3bsr"])
    said = capsys.readouterr()
    assert code == 2 and not (tmp_path / "s" / "runs").exists()
    assert sum(f"change nothing in m3bsr on {tiny} (no_specific_experts=true" in line
               for line in said.out.splitlines()) == 3
    assert "(the paper's grids need m3bsr@paper)" in said.err


def test_sensitivity_seed_noise_against_hand_computed_anova():
    """Cells [1, 3] and [2, 5] (seeds 0, 1): SS cells 2.25, SS seeds 6.25, SS total 8.75, so SS residual 0.25
    and F = 2.25 / 0.25 = 9 on (1, 1) df, whose p is the two-sided Cauchy tail at 3: 1 - 2 arctan(3) / pi."""
    from m3bsr.experiments.sensitivity import seed_noise

    std, resid, p = seed_noise([[1.0, 3.0], [2.0, 5.0]])
    assert std == pytest.approx(np.sqrt((2 + 4.5) / 2) / 2.75)
    assert resid == pytest.approx(0.5 / 2.75)
    assert p == pytest.approx(1 - 2 * np.arctan(3) / np.pi)
    assert seed_noise([[1.0], [2.0]]) is None and seed_noise([[1.0, 2.0]]) is None


def test_sensitivity_seed_noise_sees_a_small_effect_under_a_large_shared_seed_shift():
    """Seeds shift every cell by -1, 0 or +1; cell 2 is always 0.01 above cell 1 and cell 3 0.02. The within-cell
    std is large, but compared within a seed the cells differ (a one-way ANOVA would miss it: p ~ 1)."""
    from scipy import stats

    from m3bsr.experiments.sensitivity import seed_noise

    rng = np.random.default_rng(0)
    y = 10 + np.array([-1.0, 0.0, 1.0])[None, :] + np.array([0.0, 0.01, 0.02])[:, None] + rng.normal(0, 1e-3, (3, 3))
    std, resid, p = seed_noise(y.tolist())
    assert std > 0.05 and resid < 0.001 and p < 1e-3
    assert stats.f_oneway(*y).pvalue > 0.9


def test_sensitivity_with_seeds_states_their_noise(tiny, tmp_path):
    out = tmp_path / "sens2"
    table = experiment("sensitivity", tiny, out, "--seeds", "0,1", "--set",
                       'sensitivity.grids={a: "T_b=5,10 lambda_b=0.02"}')
    assert len(table) == 4
    md, meta = check_outputs(out, "sensitivity")
    (claim,) = meta["claims"]
    assert "seed std within a cell" in claim["evidence"] and "ANOVA over cells with seeds as blocks p = " in md


@pytest.mark.slow  # one spawned process per run (a fresh interpreter imports torch): ~10 s on an idle machine
def test_cost_reads_epoch_times_and_measures_memory_and_latency(tiny, tmp_path):
    out = tmp_path / "cost"
    table = experiment("cost", tiny, out, "--seeds", "0", "--models", "sasrec,pop", "--set", "cost.predictions=3",
                       "--set", "cost.steps=1")
    assert list(table["model"]) == ["sasrec", "pop"]
    runs = {m: json.loads((out / "runs" / f"{m}-s0" / "metrics.json").read_text()) for m in ("sasrec", "pop")}
    assert table["seconds_per_epoch"].tolist() == pytest.approx(
        [runs["sasrec"]["seconds_per_epoch"], runs["pop"]["seconds_per_epoch"]], rel=1e-5)
    assert (table["ms_per_prediction"] > 0).all()
    assert table.loc[0, "peak_memory_mb"] > 10 and np.isnan(table.loc[1, "peak_memory_mb"])  # pop trains no step
    check_outputs(out, "cost")


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    """A small synthetic dataset: content features and the generator's categories (label_category)."""
    from m3bsr.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "syn"
    prepare("synthetic", "synthetic", out, log=lambda m: None,
            overrides=["synthetic.users=60", "synthetic.items=50", "n_negatives=10"])
    return out


def test_cluster_score_separates_a_planted_clustering_from_a_random_one():
    from m3bsr.experiments.tsne import cluster_scores

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    planted = np.repeat(np.arange(4), 30)
    x = centres[planted] + 0.3 * rng.normal(size=(120, 16))
    good = cluster_scores(x, planted, k=10)
    shuffled = cluster_scores(x, rng.permutation(planted), k=10)
    assert good["silhouette"] > 0.4 and good["knn_accuracy"] > 0.95
    assert shuffled["silhouette"] < 0.02 and shuffled["knn_accuracy"] < 0.5  # random labels: no cluster (about -0.09)
    # an item is never its own neighbour: each item's twin (distance 0) carries the other category
    twins = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert cluster_scores(twins, np.array(list("abab")), k=1)["knn_accuracy"] == 0.0
    assert cluster_scores(twins, np.array(list("aabb")), k=1) == {"silhouette": 1.0, "knn_accuracy": 1.0}
    assert cluster_scores(x, planted.astype(str), k=10) == good  # categories may be text


def test_tsne_scores_representations_before_and_after_cdmd_m_and_the_mlp(tiny_synthetic, tmp_path):
    import torch

    from m3bsr.engine.checkpoint import load_run_model
    from m3bsr.experiments.tsne import cluster_scores, item_categories, item_representations
    from m3bsr.experiments.config import TsneSettings

    out = tmp_path / "tsne"
    table = experiment("tsne", tiny_synthetic, out, "--seeds", "0,1", "--set", "tsne.k=5")
    assert sorted(set(zip(table["denoiser"], table["stage"]))) == [("diffusion", "after"), ("diffusion", "before"),
                                                                   ("mlp", "after"), ("mlp", "before")]
    assert len(table) == 2 * 2 * 2 and set(table["items"]) == {50} and set(table["categories"]) == {10}
    assert set(table["model"]) == {"m3bsr@paper", "m3bsr@paper+modality_denoiser=mlp"}
    md, meta = check_outputs(out, "tsne")
    assert "CDMD-M clusters tighter than the MLP (silhouette)" in md and len(meta["claims"]) == 4
    assert all(c["held"] in (True, False) for c in meta["claims"])
    # the numbers are the scores of the stored runs' representations, by the dataset's categories
    model, _, _ = load_run_model(out / "runs" / "m3bsr@paper+modality_denoiser=mlp-s1")
    cats = item_categories(tiny_synthetic, TsneSettings())
    items = np.sort(cats.index.to_numpy())
    reps = item_representations(model, items)
    assert reps["after"].shape == (50, 2 * 8)  # image and text, hidden size 8
    row = table[(table["denoiser"] == "mlp") & (table["stage"] == "after") & (table["seed"] == 1)].iloc[0]
    assert row["silhouette"] == pytest.approx(cluster_scores(reps["after"], cats[items].to_numpy(), 5)["silhouette"])
    # "after" is the module's output for the "before" token: the MLP applied to it
    from m3bsr.models.denoiser import normalize_x0

    x = torch.from_numpy(reps["before"][:, :8])
    mlp = model.cdmd_m.mlp
    G = mlp[0].weight.shape[0]  # (aux, image), (aux, text), (target, image), (target, text)
    expected = mlp(normalize_x0(x).unsqueeze(0).expand(G, -1, -1))[G // 2].detach().numpy()
    np.testing.assert_allclose(reps["after"][:, :8], expected, rtol=1e-4, atol=1e-5)


def test_tsne_without_the_category_is_a_one_line_error(tiny, tiny_synthetic, tmp_path, capsys):
    base = ["experiment", "tsne", "--out", str(tmp_path / "x"), "--seeds", "0", *TINY]
    assert cli_main([*base, "--dataset", str(tiny)]) == 2
    err = capsys.readouterr().err
    assert "no item label 'category' (labels: none)" in err and "items.labels" in err
    assert cli_main([*base, "--dataset", str(tiny_synthetic), "--set", "tsne.category=genres"]) == 2
    assert "(labels: category)" in capsys.readouterr().err
    assert not (tmp_path / "x" / "runs").exists()  # nothing trained


def test_report_includes_the_tsne_figure(tiny_synthetic, tmp_path):
    import base64

    out = tmp_path / "tsne"
    experiment("tsne", tiny_synthetic, out, "--seeds", "0")
    assert cli_main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert f"data:image/png;base64,{base64.b64encode((out / 'tsne.png').read_bytes()).decode()}" in page
    assert "Item representations (paper Figure 5)" in page


@pytest.mark.parametrize("name", ["ablation", "sensitivity", "coldstart", "tsne", "cost", "noise"])
def test_check_configs_builds_the_starting_entries_of_each_experiment(name, tmp_path):
    """``Context.check_configs`` (run by the command before the experiment's module imports torch) builds the
    runs' configs of the entries each experiment starts from: its defaults pass, a misspelt run key fails, and
    ``--models`` replaces the defaults (a base experiment reads only the first entry)."""
    from m3bsr.errors import InputError
    from m3bsr.experiments import EXPERIMENTS
    from m3bsr.experiments.base import Context

    assert name in EXPERIMENTS
    Context(dataset=tmp_path, out=tmp_path, seeds=[0, 1]).check_configs(name)
    with pytest.raises(InputError, match="unknown config key 'train.max_epoch'"):
        Context(dataset=tmp_path, out=tmp_path, seeds=[0], sets=["train.max_epoch=1"]).check_configs(name)
    one_base = name in ("ablation", "sensitivity", "tsne")  # sasrec alone, or both (m3bsr's validator answers)
    with pytest.raises(InputError, match="no listed model has this key" if one_base else "the paper's ablation"):
        Context(dataset=tmp_path, out=tmp_path, seeds=[0], models=["sasrec", "m3bsr"],
                sets=["model.no_meie=true"]).check_configs(name)
