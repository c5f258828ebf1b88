"""The digit classifier behind prompt accuracy: shipped coefficients, high on real digits, chance on noise."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from projection import ProjectionError
from projection.demo import digits
from projection.demo.classifier import fit_classifier, load_classifier
from projection.demo.teacher import load_demo_classifier


@pytest.fixture(scope="module")
def classifier():
    return load_demo_classifier()


def test_it_reads_held_out_real_digits(classifier):
    val = digits.load_digits("val")
    assert classifier.prompt_accuracy(val.images, val.labels) > 0.95
    wrong = (val.labels + 1) % 10
    assert classifier.prompt_accuracy(val.images, wrong) < 0.05


def test_on_noise_it_scores_about_chance(classifier):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, 8, 8, generator=g)
    labels = torch.arange(2000) % 10
    assert classifier.prompt_accuracy(noise, labels) < 0.2
    blank = torch.zeros(100, 8, 8)
    assert classifier.prompt_accuracy(blank, torch.arange(100) % 10) == pytest.approx(0.1)  # one class for all


def test_the_shipped_coefficients_are_what_fitting_gives(classifier):
    fitted = fit_classifier(digits.load_digits("train"))
    assert torch.allclose(fitted.weights, classifier.weights, atol=1e-3)
    assert torch.allclose(fitted.bias, classifier.bias, atol=1e-3)


def test_images_are_clipped_and_checked(classifier):
    val = digits.load_digits("val")
    assert torch.equal(classifier.predict(val.images * 3), classifier.predict((val.images * 3).clamp(0, 1)))
    with pytest.raises(ProjectionError, match=r"\[N, 8, 8\], got \[3, 64\]"):
        classifier.predict(torch.zeros(3, 64))
    with pytest.raises(ProjectionError, match="one label per image"):
        classifier.prompt_accuracy(val.images[:3], val.labels[:2])


def test_a_file_that_is_not_a_classifier_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"weights": torch.zeros(10, 16)}, str(path))
    with pytest.raises(ProjectionError, match="c.safetensors: not a digit classifier"):
        load_classifier(path)
