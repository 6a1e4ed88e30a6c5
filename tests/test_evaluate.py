"""`vstain evaluate` and evaluate_model on tiny simulated pairs with a tiny model."""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from napari_vstain import cli, metrics
from napari_vstain.baselines.cgan import CGANConfig, build_cgan, save_cgan
from napari_vstain.engine.checkpoint import save_model
from napari_vstain.settings import StainSettings
from napari_vstain.engine.model import ModelConfig, VStainModel
from napari_vstain.evaluate import (EvaluationSettings, evaluate_model, markdown_report,
                                    simulated_pairs, write_results)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_model(VStainModel(ModelConfig.tiny()), folder / "tiny.safetensors")
    save_model(VStainModel(ModelConfig.tiny()), folder / "other.safetensors")
    save_cgan(build_cgan(CGANConfig.tiny(), seed=0), folder / "cgan.safetensors",
              extra={"steps": 3, "time_s": 1.0})
    return folder


@pytest.fixture
def vstain(monkeypatch):
    """cli.main restricted to the evaluate subcommand (the other modules are not under test)."""
    monkeypatch.setattr(cli, "COMMANDS", {"evaluate": cli.COMMANDS["evaluate"]})
    return lambda *argv: cli.main(["evaluate", *map(str, argv)])


def test_vstain_evaluate_writes_json_and_markdown_with_every_section(checkpoints, vstain,
                                                                     tmp_path, capsys):
    out = tmp_path / "results"
    code = vstain("--simulate", "lung,heart", "--count", 1, "--seed", 200, "--size", 64,
                  "--checkpoint", checkpoints / "tiny.safetensors",
                  "--cgan", checkpoints / "cgan.safetensors", "--steps", 3, "--samples", 2,
                  "--repeats", 2, "--cv-steps", 4, "--fast-steps", 2, "--cv-images", 1,
                  "--cv-crop", 32, "--device", "cpu", "--out", out)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["diffusion", "false colour + bicubic", "cGAN"]
    assert [p["name"] for p in results["pairs"]] == ["lung_200", "heart_200"]
    assert all(p["simulated"] for p in results["pairs"])
    for method in results["methods"]:
        summary = results["summary"][method]
        assert -1 <= summary["ssim"]["mean"] <= 1 and summary["ssim"]["n"] == 2
        assert 0 < summary["psnr"]["mean"] < 60
        assert set(summary["pigment"]) >= {"precision", "recall", "f1"}
        assert len(results["per_image"][method]) == 2
        if metrics.lpips_available():
            assert summary["lpips"]["mean"] > 0
    # Summaries by tissue: each the summary of that tissue's images alone.
    assert list(results["by_group"]) == ["lung", "heart"]
    assert [p["group"] for p in results["pairs"]] == ["lung", "heart"]
    for i, group in enumerate(["lung", "heart"]):
        for method in results["methods"]:
            entry = results["by_group"][group][method]
            assert entry["ssim"]["n"] == 1
            assert entry["ssim"]["mean"] == pytest.approx(
                results["per_image"][method][i]["ssim"])
    assert list(results["variance"]["per_image"]) == ["lung_200"]
    study = results["variance"]["mean"]
    assert list(study) == ["fast", "mean", "skip", "vanilla"]  # the sampler table's order
    for sampler, entry in study.items():
        assert list(entry["by_count"]) == ["1", "2", "3", "5"]
        assert all(entry["by_count"][n]["mean_cv"]["mean"] >= 0 for n in entry["by_count"])
    # Averaging five stochastic samples must reduce the run-to-run variation.
    vanilla = study["vanilla"]["by_count"]
    assert vanilla["5"]["mean_cv"]["mean"] < vanilla["1"]["mean_cv"]["mean"]
    assert study["vanilla"]["steps"] == 4 and study["fast"]["steps"] == 2
    assert results["context"]["command"].startswith("vstain evaluate --simulate lung,heart")
    correlation = results["cv_error_correlation"]  # N = 2 samples: a CV map to score
    assert correlation["samples"] == 2
    assert [r["name"] for r in correlation["per_image"]] == ["lung_200", "heart_200"]
    for key in ("cv", "darkness", "cv_tissue", "darkness_tissue"):
        assert -1 <= correlation["mean"][key]["mean"] <= 1
    assert all(r["pixels"] == 64 * 64 for r in correlation["per_image"])
    assert "Does the CV map point at the errors?" in (out / "results.md").read_text()

    assert "examples" not in results
    figure = plt.imread(out / "comparison.png")
    assert figure.shape[0] > 200 and figure.shape[1] > 4 * figure.shape[0] / 2 * 0.8

    report = (out / "results.md").read_text()
    for text in ("![AF input, each method's output and the H&E target](comparison.png)",
                 "## Image quality", "SSIM (RGB, per-channel averaged)", "PSNR (dB)",
                 "Pigment F1", "## Output variance", "CV, N = 5", "mean (t_e = 50)",
                 "skip (t_e = 50)", "SIMULATED", "lung: seeds 200", "heart: seeds 200",
                 "training used seeds >= 1000", "| cGAN |", "| false colour + bicubic |",
                 "## Per image", "## Command", "vstain evaluate", "By tissue",
                 "| heart | 1 | cGAN |",
                 "a central 32 px crop of 1 image (lung_200)"):
        assert text in report, text
    assert ("LPIPS (AlexNet)" in report) and (
        "unavailable" not in report.split("## Output variance")[0]
        if metrics.lpips_available() else "LPIPS unavailable" in report)
    # A second run takes the variance study from the first instead of sampling again.
    again = tmp_path / "again"
    assert vstain("--simulate", "lung", "--count", 1, "--seed", 200, "--size", 64, "--checkpoint",
                  checkpoints / "tiny.safetensors", "--steps", 2, "--samples", 1, "--no-lpips",
                  "--variance-from", out, "--out", again) == 0
    reused = json.loads((again / "results.json").read_text())
    assert reused["variance"] == results["variance"]
    assert reused["settings"]["cv_crop"] == 32 and reused["settings"]["repeats"] == 2
    assert "taken from the earlier run" in (again / "results.md").read_text()
    assert vstain("--simulate", "lung", "--count", 1, "--size", 64, "--checkpoint",
                  checkpoints / "other.safetensors", "--variance-from", out, "--out",
                  tmp_path / "other") == 2
    assert "another model" in capsys.readouterr().err
    # Existing results are not overwritten unless asked.
    assert vstain("--simulate", "lung", "--count", 1, "--size", 64, "--checkpoint",
                  checkpoints / "tiny.safetensors", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err


def test_vstain_evaluate_refuses_training_seeds_and_bad_settings(checkpoints, vstain, tmp_path,
                                                                 capsys):
    base = ["--checkpoint", checkpoints / "tiny.safetensors", "--size", 64, "--out",
            tmp_path / "r"]
    assert vstain("--simulate", "lung", "--seed", 999, "--count", 2, *base) == 2
    assert "seeds from 1000 on are training data" in capsys.readouterr().err
    assert vstain("--simulate", "lung", "--repeats", 1, *base) == 2
    assert "--repeats must be at least 2" in capsys.readouterr().err
    assert vstain("--simulate", "lung", "--samplers", "vanilla,slow", *base) == 2
    assert "slow" in capsys.readouterr().err
    assert vstain("--data", tmp_path / "nowhere", *base) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_vstain_evaluate_reads_a_folder_of_pairs(checkpoints, vstain, tmp_path):
    from napari_vstain.data.pairs import write_pairs
    from napari_vstain.data.simulate import simulate_pair

    pair = simulate_pair("lung", 64, 4, 5)
    pair.metadata["name"] = "held_out"
    write_pairs(tmp_path / "pairs", [pair])
    out = tmp_path / "results"
    assert vstain("--data", tmp_path / "pairs", "--checkpoint", checkpoints / "tiny.safetensors",
                  "--samplers", "none", "--no-lpips", "--steps", 2, "--samples", 1,
                  "--register", "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pairs"][0]["name"] == "held_out"
    assert results["variance"]["mean"] == {}
    assert results["lpips"] == metrics.LPIPS_UNAVAILABLE
    assert results["summary"]["diffusion"]["lpips"] is None
    report = (out / "results.md").read_text()
    assert "unavailable" in report and "## Output variance" not in report
    assert "registered onto its AF image" in report and results["settings"]["register"]
    assert results["pigment_detector_vs_simulator"] is not None  # scored before registering
    assert (out / "comparison.png").is_file()
    assert results["cv_error_correlation"] is None  # N = 1: no CV map to score
    assert "Does the CV map point at the errors?" not in report


def test_evaluate_model_scores_a_perfect_method_as_perfect(monkeypatch):
    """With the diffusion output replaced by the target itself, SSIM is 1, PSNR inf and the
    pigment F1 is 1 (where the target has pigment), and the report says so."""
    from napari_vstain.evaluation import running

    pairs = [simulate for simulate in simulated_pairs(["lung"], 1, 3, 64, 4)]
    target = pairs[0]["he"]

    class Perfect:
        rgb = target
        cv = np.zeros(target.shape[:2], np.float32)

    monkeypatch.setattr(running, "_stain", lambda *args, **kwargs: Perfect)
    model = VStainModel(ModelConfig.tiny())
    settings = EvaluationSettings(stain=StainSettings(steps=2, samples=1), samplers=(),
                                  false_colour=False, lpips=False)
    results = evaluate_model(model, pairs, settings)
    row = results["per_image"]["diffusion"][0]
    assert row["ssim"] == pytest.approx(1.0) and math.isinf(row["psnr"])
    summary = results["summary"]["diffusion"]
    assert summary["psnr"]["infinite"] == 1 and summary["psnr"]["mean"] is None
    if metrics.pigment_mask_from_rgb(target).any():
        assert row["pigment"]["f1"] == 1.0
    report = markdown_report(results)
    assert "inf" in report


def test_write_results_is_strict_json_and_refuses_overwrite(tmp_path):
    results = {"methods": [], "summary": {}, "per_image": {}, "pairs": [],
               "variance": {"per_image": {}, "mean": {}}, "lpips": "LPIPS unavailable",
               "pigment_detector_vs_simulator": None, "cgan": None,
               "model": {"checkpoint_hash": None, "extra": {}},
               "settings": EvaluationSettings().to_dict(), "value": [math.nan, math.inf,
                                                                      np.float32(0.5)]}
    json_path, md_path = write_results(results, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["value"] == [None, "inf", 0.5]
    assert md_path.read_text().startswith("# Evaluation results")
    with pytest.raises(FileExistsError):
        write_results(results, tmp_path)


def test_variance_study_pairs_are_spread_and_cropped_centrally():
    from napari_vstain.evaluate import central_crop, study_indices

    assert study_indices(16, 2) == [0, 15]  # the first lung and the last heart pair
    assert study_indices(16, None) == list(range(16))
    assert study_indices(3, 5) == [0, 1, 2]
    record = {"af": np.zeros((4, 16, 16), np.float32), "he": np.zeros((64, 64, 3), np.uint8),
              "pigment": np.zeros((64, 64), bool)}
    record["af"][:, 6:10, 6:10] = 1
    cropped = central_crop(record, 16, 4)
    assert cropped["af"].shape == (4, 4, 4) and cropped["af"].min() == 1
    assert cropped["he"].shape == (16, 16, 3) and cropped["pigment"].shape == (16, 16)
    assert central_crop(record, None, 4) is record and central_crop(record, 64, 4) is record


def test_error_correlation_ranks_pixels_by_error_beside_the_darkness_baseline():
    from napari_vstain.evaluation.running import absolute_error_map, error_correlation

    rng = np.random.default_rng(0)
    stained = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    target = np.full((32, 32, 3), 255, np.uint8)  # white: the error is the stain's darkness
    error = absolute_error_map(stained, target)
    np.testing.assert_allclose(error, 1 - stained.mean(axis=-1) / 255, atol=1e-6)
    tissue = np.zeros((32, 32), bool)
    tissue[:16] = True
    exact = error_correlation(stained, target, error, tissue)
    assert exact["cv"] == pytest.approx(1.0) and exact["darkness"] == pytest.approx(1.0)
    assert exact["cv_tissue"] == pytest.approx(1.0)
    assert exact["pixels"] == 32 * 32 and exact["tissue_pixels"] == 16 * 32
    assert error_correlation(stained, target, -error)["cv"] == pytest.approx(-1.0)
    unrelated = error_correlation(stained, target, rng.random((32, 32)))
    assert abs(unrelated["cv"]) < 0.1 and unrelated["cv_tissue"] is None
    assert error_correlation(stained, target, np.zeros((32, 32)))["cv"] is None  # constant
    # a target that differs from the stain only where the uncertainty is high
    wrong = stained.copy()
    uncertainty = np.zeros((32, 32))
    uncertainty[8:12, 8:12] = 1.0
    wrong[8:12, 8:12] = 255 - wrong[8:12, 8:12]
    scored = error_correlation(stained, wrong, uncertainty)
    assert scored["cv"] > 0.3 and abs(scored["darkness"]) < scored["cv"]
    # large images are scored on a strided sample of at most max_pixels
    assert error_correlation(stained, target, error, max_pixels=100)["pixels"] <= 100


def test_real_pairs_are_held_out_and_summarised_by_their_h_and_e_image(checkpoints):
    """`--simulate real` pairs come from the held-out parts of the real images and are
    summarised per image they were cut from; the report says their AF is simulated."""
    from napari_vstain.data.from_he import real_he_images
    from napari_vstain.engine.checkpoint import load_model

    if not real_he_images():
        pytest.skip("no real H&E images installed (scripts/setup.sh --dev installs them)")
    pairs = simulated_pairs(["real", "lung"], 3, 200, 64, 4)
    model = load_model(checkpoints / "tiny.safetensors")
    settings = EvaluationSettings(stain=StainSettings(sampler="fast", steps=2, samples=1),
                                  lpips=False, false_colour=False, samplers=(), device="cpu")
    results = evaluate_model(model, pairs, settings)
    groups = [p["group"] for p in results["pairs"]]
    assert groups[3:] == ["lung"] * 3
    assert all(g.startswith("real: ") for g in groups[:3])
    assert set(results["by_group"]) == set(groups)
    for group in set(groups):
        rows = [r["ssim"] for r, g in zip(results["per_image"]["diffusion"], groups) if g == group]
        assert results["by_group"][group]["diffusion"]["ssim"]["mean"] == pytest.approx(
            np.mean(rows))
    report = markdown_report(results)
    assert "AF is SIMULATED from its colour deconvolution" in report
    # a real H&E has no true pigment map to check the detector against
    only_real = evaluate_model(model, pairs[:1], settings)
    assert only_real["pigment_detector_vs_simulator"] is None


def test_the_report_says_when_the_cgan_budget_is_not_matched():
    """The cGAN's training time is compared with the diffusion model's whole training (a
    continued model counts the model it started from); unknown is said, not guessed."""
    from napari_vstain.evaluation.report import _budget_comparison

    assert "the same wall-clock budget" in _budget_comparison(6000.0, 6300.0)
    assert "NOTE: 50% of the diffusion model's" in _budget_comparison(3000.0, 6000.0)
    assert "not recorded" in _budget_comparison(6000.0, None)
    assert _budget_comparison(None, 6000.0) == ""
