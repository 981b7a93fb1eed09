"""The results script on small fake run directories."""

import json

import numpy as np
import pytest

from stepjax.config import apply_overrides, load_experiment
from stepjax.models.__main__ import param_count
from stepjax.results import (
    collect,
    controller_label,
    epoch_means,
    group_stats,
    main,
    single_seed_lines,
    verdict,
    welch_p,
    write_report,
)


def fake_run(root, group, controller, seed, accuracies, status="done", variant=":cpu"):
    d = root / f"{group}{variant.replace(':', '_')}_s{seed}"
    d.mkdir(parents=True)
    config = apply_overrides(load_experiment(f"{group}:cpu"), [f"seed={seed}", f"train.epochs={len(accuracies)}",
                                                                 "data.source='npz'", "data.dir='/data'"])
    assert config.model.controller == controller
    config.experiment = f"{group}{variant}"
    (d / "config.json").write_text(config.to_json())
    lines = [{"step": 10 * (e + 1), "split": "train", "time": 0, "loss": 2.0 / (e + 1), "accuracy": 0.1,
              "images_per_sec": 100.0 * (e + 1)}
             for e in range(len(accuracies))]
    lines += [{"step": 10 * (e + 1), "split": "test", "time": 0, "epoch": e + 1, "accuracy": a, "loss": 1.0}
              for e, a in enumerate(accuracies)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"status": status, "wall_time_s": 60.0, "steps": 10 * len(accuracies)}))
    (d / "command.txt").write_text(f"python -m stepjax.main --config {group}:cpu seed={seed}\n")
    (d / "code.txt").write_text("2026-11-26T00:00:00+00:00 abc1234\n2026-11-26T01:00:00+00:00 abc1234\n"
                                "2026-11-26T02:00:00+00:00 def5678+dirty\n")


def test_results_tables_and_figure(tmp_path):
    for seed, best in enumerate([0.80, 0.82, 0.81]):
        fake_run(tmp_path / "runs", "cifar10_resnet", "constant", seed, [0.5, best, best - 0.01])
        evaluation = {"step": 30, "accuracy": best - 0.01, "flip_accuracy": best + 0.01}
        (tmp_path / "runs" / f"cifar10_resnet_cpu_s{seed}" / "evaluation.json").write_text(json.dumps(evaluation))
    for seed, best in enumerate([0.90, 0.91, 0.92]):
        fake_run(tmp_path / "runs", "cifar10_stepnet", "stepnet", seed, [0.6, best])
    stale = {"step": 10, "accuracy": 0.6, "flip_accuracy": 0.7}  # of an earlier checkpoint: not shown
    (tmp_path / "runs" / "cifar10_stepnet_cpu_s0" / "evaluation.json").write_text(json.dumps(stale))
    fake_run(tmp_path / "runs", "cifar10_se", "se", 0, [0.4], status="running")
    records = collect(tmp_path / "runs")
    stats = group_stats(records)
    assert set(stats) == {"cifar10_resnet", "cifar10_stepnet"}  # unfinished runs are not averaged
    np.testing.assert_allclose(stats["cifar10_resnet"]["best_mean"], 0.81)
    np.testing.assert_allclose(stats["cifar10_resnet"]["best_std"], 0.01)
    np.testing.assert_allclose(stats["cifar10_resnet"]["last_mean"], 0.80)
    fake_run(tmp_path / "gpu", "cifar10_stepnet", "stepnet", 0, [0.3, 0.35], status="preempted", variant="")
    fake_run(tmp_path / "runs", "cifar10_cbam", "cbam", 0, [0.5, 0.7])  # one seed: a mean without a spread
    out, fig = tmp_path / "docs" / "RESULTS.md", tmp_path / "docs" / "figures" / "c.png"
    main(["--root", str(tmp_path / "runs"), str(tmp_path / "gpu"), str(tmp_path / "missing"), "--out", str(out),
          "--figure", str(fig)])
    text = out.read_text()
    plain, stepnet = (param_count("resnet20", 10, c) / 1e6 for c in ("constant", "stepnet"))
    assert f"| cifar10_resnet | {plain:.3f} | 3 | 81.00 ± 1.00 | 80.00 ± 1.00 | 82.00 ± 1.00 (3) |" in text
    assert f"| cifar10_stepnet | {stepnet:.3f} | 3 | 91.00 ± 1.00 | 91.00 ± 1.00 |  (0) |" in text
    cbam = param_count("resnet20", 10, "cbam") / 1e6
    assert f"| cifar10_cbam | {cbam:.3f} | 1 | 70.00 | 70.00 |  (0) |" in text
    # seed 0: 0.70 - 0.80 and 0.70 - 0.90; stepnet - resnet by seed: 0.10, 0.09, 0.11 (std 0.01)
    assert "- cifar10_cbam (seed 0 only): 70.00 % best; minus the same seed of: cifar10_resnet -10.00, " \
           "cifar10_stepnet -20.00 points." in text
    assert "standard deviation of 1.00 points," in text
    assert "cifar10_stepnet vs cifar10_resnet: +10.00 points in mean best" in text
    assert "cifar10_stepnet vs cifar10_resnet: +11.00 points in mean last" in text and "significant at 0.05 by the paired test (better)" in text
    assert "cifar10_stepnet vs cifar10_se: not enough finished runs yet." in text
    assert "cifar10_se vs cifar10_resnet: not enough finished runs yet." in text
    assert "| 1.0 min | 200 (280) | 2.000 -> 0.667 |" in text  # images/s median (p90) of 100, 200, 300
    assert "2.000 -> 0.667" in text and "seed=2" in text and "| abc1234, def5678+dirty |" in text
    assert "- cifar10_resnet: resnet20, 3 epochs of batch 32, SGD momentum 0.9 (Nesterov), lr 0.05 cosine" in text
    cpu, paper = text.split("## cpu protocol")[1].split("## paper protocol")
    assert "cifar10_stepnet_s0" not in cpu and "| stepnet | 0 | preempted after 2 of 2 epochs | 35.00 |" in paper
    assert "cifar10_stepnet vs cifar10_resnet: not enough finished runs yet." in paper  # a stopped run is not averaged
    assert "cifar10_channel_step" not in text  # a control that no protocol trained is not compared
    for variant in ("cpu", "paper"):
        assert (fig.parent / f"c_{variant}.png").stat().st_size > 1000 and f"(figures/c_{variant}.png)" in text


def test_a_trained_control_is_compared_with_the_three(tmp_path):
    for seed, (plain, control) in enumerate([(0.78, 0.79), (0.77, 0.80)]):
        fake_run(tmp_path / "runs", "cifar10_resnet", "constant", seed, [plain])
        fake_run(tmp_path / "runs", "cifar10_channel_step", "channel_step", seed, [control])
    out = tmp_path / "R.md"
    main(["--root", str(tmp_path / "runs"), "--out", str(out), "--figure", str(tmp_path / "c.png")])
    text = out.read_text()
    assert "- cifar10_channel_step vs cifar10_resnet: +2.00 points in mean best accuracy" in text
    assert "paired by seed: +2.00 ± 1.41 points, n=2" in text
    assert "- cifar10_channel_step vs cifar10_se: not enough finished runs yet." in text


def test_resumed_run_counts_each_step_once_and_eval_time(tmp_path):
    fake_run(tmp_path, "cifar10_se", "se", 0, [0.5, 0.6, 0.7])
    d = tmp_path / "cifar10_se_cpu_s0"
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join(lines[:2] + lines[1:2] + lines[2:] + lines[4:5]) + "\n")  # re-logged after a kill
    (d / "summary.json").write_text(json.dumps({"status": "done", "wall_time_s": 600.0, "eval_time_s": 60.0}))
    (record,) = collect(tmp_path)
    assert record["epochs"] == [1, 2, 3] and record["train_steps"] == [10, 20, 30]
    assert record["wall_time_s"] == 660.0
    (d / "summary.json").write_text(json.dumps({"status": "preempted", "wall_time_s": 60.0, "steps": 20}))
    assert collect(tmp_path)[0]["status"] == "running"  # resumed after the stop: step 30 is logged
    (d / "summary.json").write_text(json.dumps({"status": "preempted", "wall_time_s": 60.0, "steps": 30}))
    assert collect(tmp_path)[0]["status"] == "preempted"


def _stats(**accuracy_by_seed):
    return {name: {"best": np.array(list(v.values())), "best_by_seed": v} for name, v in accuracy_by_seed.items()}


def test_verdict_says_no_significant_difference():
    stats = _stats(a={0: 0.90, 1: 0.92, 2: 0.91}, b={0: 0.91, 1: 0.90, 2: 0.92})
    assert "no significant difference (paired test)" in verdict(stats, [("a", "b")])[0]
    assert np.isnan(welch_p(np.array([1.0]), np.array([1.0, 2.0])))


def test_verdict_pairs_runs_by_seed():
    # a constant gain hidden under a large seed-to-seed spread: Welch sees nothing, the pairing does.
    # Paired differences 0.010, 0.011, 0.009: t = 0.01 / (0.001 / sqrt 3) = 17.32 with 2 degrees of
    # freedom, whose two-sided p-value is 1 - t / sqrt(t^2 + 2) = 0.0033.
    b = {0: 0.80, 1: 0.85, 2: 0.90}
    stats = _stats(a={0: 0.810, 1: 0.861, 2: 0.909}, b=b)
    line = verdict(stats, [("a", "b")])[0]
    assert "+1.00 points in mean best accuracy" in line and "paired by seed: +1.00 ± 0.10 points, n=3, p=0.003" in line
    assert "significant at 0.05 by the paired test (better)" in line
    # (t_0.975 + t_0.8 with 2 degrees of freedom) * sd / sqrt(3) = (4.303 + 1.061) * 0.1 / 1.732 points
    assert "detectable at 80 % power: 0.31 points" in line
    assert float(line.split("Welch p=")[1].split(";")[0]) > 0.5
    # one shared seed: no pairing, the words fall back to Welch
    line = verdict(_stats(a={0: 0.81, 5: 0.86}, b=b), [("a", "b")])[0]
    assert "paired" not in line and "no significant difference (Welch test)" in line
    # one seed each: the difference, no p-value, and the single runs compared seed against seed
    stats = {name: {**s, "n": 1} for name, s in _stats(a={0: 0.7962}, b={0: 0.7835}).items()}
    assert verdict(stats, [("a", "b")]) == ["- a vs b: +1.27 points in mean best accuracy (n=1 vs 1): too few seeds for a test."]
    assert single_seed_lines(stats) == ["- a (seed 0 only): 79.62 % best; minus the same seed of: b +1.27 points.",
                                        "- b (seed 0 only): 78.35 % best; minus the same seed of: a -1.27 points."]


def test_verdict_gives_confidence_intervals_and_the_uncertainty_of_the_sd():
    # the data of test_verdict_pairs_runs_by_seed: paired differences 1.0, 1.1, 0.9 points (sd 0.1)
    stats = _stats(a={0: 0.810, 1: 0.861, 2: 0.909}, b={0: 0.80, 1: 0.85, 2: 0.90})
    line = verdict(stats, [("a", "b")])[0]
    # t-interval of the mean paired difference: 1.00 ± t_{0.975, 2} 0.1 / sqrt 3 = 1.00 ± 4.303 * 0.0577
    assert "p=0.003, 95 % CI [+0.75, +1.25]" in line
    # Welch: variances 0.002451 and 0.0025 over 3 seeds each, se 0.04062, Welch-Satterthwaite df 4.0:
    # 1.00 ± 2.776 * 4.062 points
    assert "+1.00 points in mean best accuracy, 95 % CI [-10.28, +12.28] (n=3 vs 3" in line
    # an sd from 3 seeds: 0.1 * sqrt(2 / chi2_{0.975, 2}) = 0.052 to 0.1 * sqrt(2 / chi2_{0.025, 2}) = 0.628
    # points; the detectable difference at the upper end is 0.31 * 6.28 = 1.95 points
    assert "uncertain from 3 seeds (95 % CI 0.05 to 0.63 points), and at its upper end 1.95 points" in line
    from stepjax.results import sd_interval  # here: the module's other tests run on code without it

    low, high = sd_interval(np.array([0.010, 0.011, 0.009]))
    np.testing.assert_allclose([low, high], [0.001 * 0.5206583, 0.001 * 6.2847347], rtol=1e-6)
    stats = {name: {**s, "n": len(s["best"])} for name, s in stats.items()}
    stats["c"] = {"best": np.array([0.7]), "best_by_seed": {0: 0.7}, "n": 1}
    assert single_seed_lines(stats)[-1] == (  # one pair of multi-seed experiments: one sd, not a range
        "- For scale: between the multi-seed experiments the same-seed differences vary from seed to seed with a "
        "standard deviation of 0.10 points, so a single-seed difference below about twice that is no evidence "
        "either way. It rests on 3 seeds; the upper end of its 95 % interval is 0.63 points.")


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="No run directories"):
        main(["--root", str(tmp_path)])


def test_comparison_pairs_must_be_written_a_colon_b(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path), "--compare", "cifar10_stepnet"])
    assert "--compare takes pairs written A:B" in capsys.readouterr().err


def test_epoch_means_of_the_logged_training_loss():
    ends, means = epoch_means([5, 10, 15, 20, 25], [4.0, 2.0, 3.0, 1.0, 0.5], steps_per_epoch=10)
    np.testing.assert_allclose(ends, [1, 2, 3])
    np.testing.assert_allclose(means, [3.0, 2.0, 0.5])


def test_controller_label_names_options_and_partial_placement():
    assert controller_label({"controller": "se", "placement": "all"}) == "se"
    nohistory = load_experiment("cifar10_stepnet_nohistory:cpu").model.to_dict()
    assert controller_label(nohistory) == "stepnet (history=False)"
    nsi = {"controller": "se", "controller_options": {}, "placement": "nsi"}
    assert controller_label(nsi) == "se (placement=nsi)"


def test_runs_of_one_experiment_under_different_protocols_are_not_pooled(tmp_path):
    fake_run(tmp_path / "runs", "cifar10_resnet", "constant", 0, [0.5, 0.8])
    fake_run(tmp_path / "runs", "cifar10_resnet", "constant", 1, [0.5, 0.8, 0.85])  # 3 epochs instead of 2
    with pytest.raises(ValueError, match="cifar10_resnet: its finished runs were trained under 2 protocols"):
        group_stats(collect(tmp_path / "runs"))
    # pilots of differing settings are reported run by run instead, each with its own protocol line
    out = tmp_path / "PILOTS.md"
    main(["--root", str(tmp_path / "runs"), "--out", str(out), "--figure", str(tmp_path / "p.png"), "--per-run"])
    report = out.read_text()
    assert "- cifar10_resnet_cpu_s0: resnet20, 2 epochs of batch 32" in report
    assert "- cifar10_resnet_cpu_s1: resnet20, 3 epochs of batch 32" in report
    assert "| cifar10_resnet_cpu_s1 | 0.272 | 1 | 85.00 | 85.00 |" in report
    assert "Verdict" not in report and "seed 0 only" not in report


def test_a_report_of_one_lone_run_under_its_own_title(tmp_path):
    fake_run(tmp_path / "runs", "cifar10_resnet", "constant", 0, [0.5, 0.8])
    assert single_seed_lines(group_stats(collect(tmp_path / "runs"))) == [
        "- cifar10_resnet (seed 0 only): 80.00 % best; no other experiment has this seed."]
    out = tmp_path / "PILOTS.md"
    main(["--root", str(tmp_path / "runs"), "--out", str(out), "--figure", str(tmp_path / "pilot.png"),
          "--title", "Pilot runs"])
    assert out.read_text().startswith("# Pilot runs\n") and (tmp_path / "pilot_cpu.png").stat().st_size > 1000


def test_a_report_draws_only_the_figures_it_is_told_to(tmp_path):
    """`draw` as a function of a figure's path and data digest (what `make results` passes, to
    redraw only the figures whose data changed); the markdown is written either way."""
    fake_run(tmp_path / "runs", "cifar10_resnet", "constant", 0, [0.5, 0.8])
    fake_run(tmp_path / "runs", "cifar10_resnet", "constant", 0, [0.5, 0.7], variant=":deep")
    asked = []

    def draw(path, value):
        asked.append((path.name, value))
        return path.name == "c_deep.png"

    _, digests = write_report(collect(tmp_path / "runs"), tmp_path / "R.md", tmp_path / "c.png", draw=draw)
    assert sorted(asked) == sorted((path.name, value) for path, value in digests.items())
    assert [p.name for p in tmp_path.glob("*.png")] == ["c_deep.png"]
    assert "(c_cpu.png)" in (tmp_path / "R.md").read_text()
