"""`sdft report` on a synthetic sweep (tests/report_sweep.py): the numbers behind every figure and
table against hand computations, with a NaN cell, a single-seed group, unequal seed counts, two task
orders and the single-task and joint references."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import report_sweep as S

from sdft_cli.analysis import stats, write_report

T975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263}  # Student t, 0.975 quantile


def ci(xs):
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return statistics.mean(xs), None
    return statistics.mean(xs), T975[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = S.build(tmp_path_factory.mktemp("sweep"))
    html = write_report(root)
    return root, html, json.loads((root / "report.json").read_text())


def _runs(method, order=None):
    return [R for (m, _, o), R in S.RUNS.items() if m == method and (order is None or o == order)]


def new_task(R):
    return (R[1][0] + R[2][1]) / 2


def prior_final(R):
    return (R[2][2] + R[2][3]) / 2  # NaN when a cell is NaN (the metric is not defined then)


def test_groups_pool_seeds_and_orders_and_keep_references_apart(report):
    _, _, data = report
    g = data["groups"]
    assert set(g) == {
        "method=sdft",
        "method=sft",
        "method=dft",
        "reference single: method=sft",
        "reference joint: method=sft",
    }
    assert g["method=sdft"]["seeds"] == [0, 1, 2] and len(g["method=sdft"]["runs"]) == 4
    assert g["method=sdft"]["orders"] == ["A → B", "B → A"]
    for method in ("sdft", "sft", "dft"):
        Rs = _runs(method)
        m, half = ci([new_task(R) for R in Rs])
        got = g[f"method={method}"]["metrics"]["new_task"]
        assert got["mean"] == pytest.approx(m) and got["n"] == len(Rs)
        assert (got["ci"] is None) == (half is None) and (half is None or got["ci"] == pytest.approx(half))
        bwt = [R[2][0] - R[1][0] for R in Rs]  # T = 2: one term, divisor T - 1 = 1
        assert g[f"method={method}"]["metrics"]["bwt"]["mean"] == pytest.approx(statistics.mean(bwt))
        prior = g[f"method={method}"]["metrics"]["prior_avg"]
        finite = [prior_final(R) for R in Rs if not math.isnan(prior_final(R))]
        assert prior["n"] == len(finite) and prior["mean"] == pytest.approx(statistics.mean(finite))
    # by order: the sdft run in order B -> A alone
    ba = g["method=sdft"]["by_order"]["B → A"]["new_task"]
    assert ba == {"mean": pytest.approx(new_task(_runs("sdft", ("B", "A"))[0])), "ci": None, "n": 1}
    assert g["method=dft"]["metrics"]["new_task"]["ci"] is None  # one seed: no interval
    # references have no sequence: new task and prior average only
    single, joint = g["reference single: method=sft"]["metrics"], g["reference joint: method=sft"]["metrics"]
    assert single["new_task"]["mean"] == pytest.approx((0.95 + 0.85) / 2) and single["bwt"]["n"] == 0
    assert single["prior_avg"]["mean"] == pytest.approx(((0.6 + 0.5) / 2 + (0.6 + 0.4) / 2) / 2)
    assert (
        joint["new_task"]["mean"] == pytest.approx((0.9 + 0.8) / 2)
        and joint["acc"]["mean"] == joint["new_task"]["mean"]
    )
    assert joint["prior_avg"]["mean"] == pytest.approx((0.5 + 0.4) / 2) and joint["forgetting_max"]["n"] == 0


def test_mean_matrices_skip_nan_cells_and_keep_orders_apart(report):
    _, _, data = report
    ab = data["matrices"]["method=sdft"]["A → B"]
    Rs = _runs("sdft", ("A", "B"))
    assert ab["columns"] == ["A", "B", "P", "Q"] and ab["rows"] == ["base", "1: A", "2: B"]
    assert ab["mean"][2][3] == pytest.approx((0.5 + 0.6) / 2) and ab["n"][2][3] == 2  # one NaN left out
    assert ab["mean"][1][0] == pytest.approx(statistics.mean(R[1][0] for R in Rs)) and ab["n"][1][0] == 3
    ba = data["matrices"]["method=sdft"]["B → A"]
    assert ba["columns"] == ["B", "A", "P", "Q"] and ba["rows"] == ["base", "1: B", "2: A"]


def test_fig3_curves_against_steps_normalised_by_the_best_of_any_group(report):
    _, _, data = report
    f = data["fig3"]
    assert f["base"] == {"A": 0.0, "B": 0.0}
    # best mean accuracy any group reached on A: the sft group's stage-1 mean (0.9 + 1.0) / 2
    assert f["best"]["A"] == pytest.approx(0.95)
    curve = {p["step"]: p for p in f["curves"]["method=sdft"]["A → B"]["A"]}
    assert sorted(curve) == [0, 5, 10, 20]  # row 0, the periodic record at step 5, both stage ends
    assert curve[5]["acc"] == pytest.approx(0.4) and curve[5]["n"] == 1
    assert curve[10]["acc"] == pytest.approx(statistics.mean([0.8, 0.6, 0.7]))
    assert curve[10]["normalized"] == pytest.approx(0.7 / 0.95)
    assert curve[20]["normalized"] == pytest.approx(statistics.mean([0.7, 0.6, 0.5]) / 0.95)


def test_pareto_front_pass_at_k_retention_and_kl(report):
    _, _, data = report
    pts = {p["group"]: p for p in data["pareto"]}
    assert set(pts) == {"method=sdft", "method=sft", "method=dft"}  # references are not points
    xy = {g: (p["x"]["mean"], p["y"]["mean"]) for g, p in pts.items()}
    for g, (x, y) in xy.items():  # dominated: another group at least as good on both axes
        dominated = any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for h, (x2, y2) in xy.items() if h != g)
        assert pts[g]["front"] == (not dominated)
    assert pts["method=sdft"]["front"] and pts["method=sft"]["front"] and not pts["method=dft"]["front"]
    pk = data["pass_at_k"]["method=sdft"]
    assert pk["trained"] == {"1": 0.5, "2": 0.7} and pk["base"] == {"1": 0.0, "2": 0.05}
    # retention: every (run, stage >= 1, prior column) drop below the base; sft's drops at tau = 0.2
    drops = [R[0][g] - R[k][g] for R in _runs("sft") for k in (1, 2) for g in (2, 3)]
    assert data["retention"]["table"]["method=sft"]["0.2"] == pytest.approx(
        sum(d <= 0.2 + 1e-12 for d in drops) / 8
    )
    sdft_drops = [R[0][g] - R[k][g] for R in _runs("sdft") for k in (1, 2) for g in (2, 3)]
    assert data["retention"]["table"]["method=sdft"]["n"] == sum(not math.isnan(d) for d in sdft_drops) == 15
    kl = [p for p in data["kl_vs_new"] if p["group"] == "method=sft" and p["stage"] == 2]
    assert sorted((p["kl"], p["new_task"]) for p in kl) == [
        (pytest.approx(0.2), 0.9),
        (pytest.approx(0.21), 1.0),
    ]


def test_paired_tests_on_shared_items_and_seed_blocks(report):
    _, _, data = report
    t = next(p for p in data["paired"] if {p["a"], p["b"]} == {"method=sdft", "method=sft"})
    assert t["a"] == "method=sdft" and t["blocks"] == 2  # sft has seeds 0 and 1 only
    mc = t["mcnemar"]["A"]  # hand count over seeds 0 and 1: only sdft right 4 + 4, only sft right 0 + 1
    assert (mc["only_a"], mc["only_b"], mc["items"]) == (8, 1, 20)
    assert mc["p"] == pytest.approx(2 * (1 + 9) / 2**9)
    # new task: sdft - sft per block = -0.05, -0.30; of the 4 sign patterns 2 reach |mean| 0.175
    perm = t["permutation"]["new_task"]
    assert perm["mean_diff"] == pytest.approx(-0.175) and perm["p"] == pytest.approx(0.5) and perm["exact"]
    assert t["permutation"]["prior_avg"]["blocks"] == 1  # seed 1's sdft prior average is undefined (NaN)


def test_acquisition_matched_attractor_references_and_drift(report):
    _, _, data = report
    acq = next(r for r in data["acquisition"] if (r["a"], r["b"]) == ("sdft", "sft"))
    # sdft stage-1 points (order A -> B): x = 0.8, 0.6, 0.7; sft candidates at stage 1: the stage ends
    # (0.9, 0.6) and (1.0, 0.4) and the periodic record (0.75, 0.5): matched within 0.05 are 0.8 -> 0.75
    # and 0.7 -> 0.75; stage 2 (B): sdft 0.9, 0.8, 0.7 vs sft 0.9 (prior 0.25), 1.0 (0.25): 0.9 only
    xs = sorted((p["stage"], p["x"], p["x_matched"]) for p in acq["points"])
    assert xs == [(1, 0.7, 0.75), (1, 0.8, 0.75), (2, 0.9, 0.9)]
    # 4 sdft runs x 2 stages, less seed 1's stage 2, whose prior average is undefined (NaN cell)
    assert acq["matched"] == 3 and acq["evaluations"] == 7
    # sdft's prior average at those evaluations minus the matched sft point's: seeds 0 and 2 at stage 1
    # ((0.7 + 0.6) / 2, (0.8 + 0.5) / 2) against the record's (0.6 + 0.4) / 2; seed 0 at stage 2
    diffs = [0.65 - 0.5, 0.65 - 0.5, 0.6 - 0.25]
    assert acq["diff"]["mean"] == pytest.approx(statistics.mean(diffs))
    # attractor: BWT (R[2,0] - R[1,0]) against R[1,0] over the 7 sequential runs, ordinary least squares
    pts = [(R[1][0], R[2][0] - R[1][0]) for R in S.RUNS.values()]
    mx, my = statistics.mean(x for x, _ in pts), statistics.mean(y for _, y in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    assert data["attractor"]["all"]["slope"] == pytest.approx(slope) and data["attractor"]["all"]["n"] == 7
    assert data["attractor"]["all"]["intercept"] == pytest.approx(my - slope * mx)
    ref = data["references"]
    assert ref["single"]["A"]["mean"] == 0.95 and ref["single"]["B"]["mean"] == 0.85
    assert ref["joint"]["A"]["mean"] == 0.9 and ref["joint"]["B"]["mean"] == 0.8
    # intransigence of sft on B: a* - R[k, k] over its runs (B trained at stage 2 in order A -> B)
    assert ref["intransigence"]["method=sft"]["B"]["mean"] == pytest.approx(
        0.85 - statistics.mean([0.9, 1.0])
    )
    assert ref["joint_gap"]["method=sft"]["A"]["mean"] == pytest.approx(0.9 - statistics.mean([0.3, 0.2]))
    d = data["drift"]["method=sdft"]
    assert d["1"]["to_base"] == 1.0 and d["2"]["to_base"] == 2.0 and d["0"]["to_base"] is None
    assert d["2"]["kl_to_base"] == pytest.approx(statistics.mean([0.2, 0.21, 0.22, 0.2]))


def test_the_page_markdown_and_figures_are_written(report):
    root, html, data = report
    assert html == root / "report.html"
    page = html.read_text()
    assert "<script" not in page and "http" not in page.split("<pre>")[0]  # self-contained: no fetches
    for name in (
        "matrices",
        "fig3_curves",
        "fig4_pareto",
        "fig5_pass_at_k",
        "retention",
        "drift",
        "acquisition_matched",
        "attractor",
        "kl_vs_new_task",
    ):
        assert name in data["figures"], name
        assert (root / "figures" / f"{name}.png").stat().st_size > 5000
        assert (root / "figures" / f"{name}.svg").is_file()
        assert f"id='{name}'" in page and f"figures/{name}.png" in (root / "report.md").read_text()
    assert page.count("data:image/png;base64,") == len(data["figures"])
    assert "McNemar, A" in page and "Acquisition-matched" in page and "Provenance" in page


def test_stats_helpers_by_hand():
    assert stats.mcnemar([1, 1, 0], [0, 1, 1]) == {"only_a": 1, "only_b": 1, "items": 3, "p": 1.0}
    assert stats.sign_flip([0.1, 0.1, 0.1])["p"] == pytest.approx(2 / 8)
    assert stats.pareto_front([(1, 1), (0.5, 0.5), (0.2, 2), (float("nan"), 3)]) == [True, False, True, False]
    assert stats.retention([0.0, 0.1, 0.3, float("nan")], [0.0, 0.1, 0.5]) == pytest.approx(
        [1 / 3, 2 / 3, 1.0]
    )
    assert stats.nearest(0.5, [(0.0, 1.0), (0.75, 2.0), (0.25, 3.0)]) == (0.75, 2.0)  # the first of equals
    big = stats.sign_flip([0.1] * 20, samples=2000)
    assert not big["exact"] and big["p"] < 0.01


def test_the_report_goes_to_wandb_offline(report, tmp_path, monkeypatch):
    """With logger=wandb the multirun's callback logs the figures and the page into one W&B run (here
    offline: the run's files on disk)."""
    from sdft_cli.analysis import log_to_wandb

    root, _, data = report
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = Path(log_to_wandb(root, project="sdft-test"))
    media = {p.name.rsplit("_", 2)[0] for p in (run_dir / "media" / "images" / "report").glob("*.png")}
    assert media == set(data["figures"])  # <key>_<step>_<hash>.png
    assert len(list((run_dir / "media" / "html" / "report").glob("page_*.html"))) == 1
