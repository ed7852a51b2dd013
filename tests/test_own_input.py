"""A person's own image: bytes to a 28 x 28 input (vae_core.drawn) and its encoding and bounds (vae_core.own_input)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vae_core import drawn
from vae_core.config import ModelConfig
from vae_core.evidence import iwae_curve, posterior_grid
from vae_core.inference import Weights
from vae_core.lab import ImageInputError, Lab
from vae_core.models import build_model


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ bytes to an input

def test_canvas_png_is_area_averaged_to_28_by_28():
    canvas = np.zeros((280, 280), np.uint8)
    canvas[10:270, 10:140] = 255  # a block of whole 10 x 10 cells: output pixels [1:27, 1:14]
    canvas[100:105, 200:210] = 255  # half of output pixel (10, 20)
    x = drawn.prepare(png(canvas))
    assert x.shape == (28, 28) and x.dtype == np.float32
    assert np.allclose(x[1:27, 1:14], 1.0, atol=1e-3) and x[0].max() == 0 and x[:, 14:20].max() == 0
    assert x[10, 20] == pytest.approx(0.5, abs=1e-2) and x.sum() == pytest.approx(26 * 13 + 0.5, abs=0.05)


def test_dark_ink_on_paper_is_inverted_and_transparency_is_paper():
    paper = np.full((56, 56), 255, np.uint8)
    paper[20:36, 20:36] = 0  # a black square on white
    x = drawn.prepare(png(paper))
    assert x[20 // 2 + 2, 20 // 2 + 2] == pytest.approx(1.0, abs=1e-3) and x[0, 0] == pytest.approx(0.0, abs=1e-3)
    rgba = np.zeros((56, 56, 4), np.uint8)  # black ink on a transparent ground
    rgba[20:36, 20:36] = (0, 0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    assert np.allclose(drawn.prepare(buf.getvalue()), x, atol=1e-3)


def test_non_square_keeps_proportions_and_mnist_fit_centres_the_ink():
    wide = np.zeros((28, 56), np.uint8)
    wide[:, :] = 0
    wide[10:18, 0:8] = 255  # ink in the left corner
    x = drawn.prepare(png(wide))
    assert x.shape == (28, 28) and x[:7].max() == 0  # padded above and below, not stretched
    m = drawn.prepare(png(wide), "mnist")
    rows, cols = np.nonzero(m > 0.05)
    assert rows.max() - rows.min() + 1 == drawn.MNIST_BOX and cols.max() - cols.min() + 1 == drawn.MNIST_BOX
    cy, cx = (np.arange(28)[:, None] * m).sum() / m.sum(), (np.arange(28)[None] * m).sum() / m.sum()
    assert abs(cy - 13.5) <= 0.5 and abs(cx - 13.5) <= 0.5
    assert drawn.prepare(png(np.zeros((40, 40))), "mnist").max() == 0  # blank stays blank


@pytest.mark.parametrize("data, message", [
    (b"not an image", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image"),
    (b"x" * (drawn.MAX_BYTES + 1), "larger than"),
])
def test_bad_bytes_get_one_line(data, message):
    with pytest.raises(ImageInputError, match=message):
        drawn.prepare(data)


def test_data_url_round_trip_and_refusals():
    raw = png(np.zeros((10, 10)))
    assert drawn.png_from_data_url("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    for bad in ("javascript:alert(1)", "data:image/png;base64,@@@", "data:text/html;base64,AAAA"):
        with pytest.raises(ImageInputError):
            drawn.png_from_data_url(bad)


# ------------------------------------------------------------------ the Lab method


@pytest.fixture
def trained(lab, tiny_config):
    run = lab.start(tiny_config.replace(epochs=2, train_size=512))
    run.join(120)
    assert run.status().state == "finished", run.status().message
    return lab.open(run.name)


def test_a_drawn_test_image_is_encoded_and_bounded(trained, tiny_sprites):
    image = tiny_sprites.test_x[3, 0].numpy()
    out = trained.own_input(png(image * 255))  # as the canvas sends it: PNG bytes
    assert np.allclose(out.image, image, atol=1 / 255)
    assert out.mu.shape == (2,) and out.logvar.shape == (2,)
    mu, logvar = trained.encode(out.evaluated[None])
    assert np.allclose(out.mu, mu[0], atol=1e-5) and np.allclose(out.logvar, logvar[0], atol=1e-5)
    assert np.allclose(out.reconstruction, trained.decode(mu)[0], atol=1e-5)
    assert out.samples.shape == (16, 28, 28) and not np.allclose(out.samples[0], out.samples[1])
    # Binarized run: the likelihood scores a 0/1 draw of the image, as it does the test images.
    assert set(np.unique(out.evaluated)) <= {0.0, 1.0}
    # ELBO <= log p_k(x) for the input (Burda et al. 2016, Theorem 1), within Monte Carlo error.
    assert out.elbo <= out.iwae + 3 * out.iwae_se
    assert out.kl > 0 and out.k == 100
    assert out.test is not None and out.test.n == 64 and out.test.elbo <= out.test.iwae + 3 * out.test.iwae_se
    # 2 latents: the true posterior, whose quadrature log p(x) the IWAE bound approaches from below.
    g = out.grid
    assert g is not None and np.allclose(g.q_mu, out.mu)
    assert out.iwae <= g.log_px + 0.5 and out.elbo <= g.log_px + 1e-6


def test_the_input_and_test_bounds_match_the_evidence_code(trained):
    """The same numbers as evidence.iwae_curve and posterior_grid give for that image on the run's weights."""
    x = np.zeros((28, 28), np.float32)
    x[8:20, 8:20] = 1.0  # already 0/1: the Bernoulli draw leaves it as it is
    out = trained.own_input(x)
    assert np.array_equal(out.evaluated, x)
    model = build_model(trained.config.model).eval()
    model.load_state_dict(trained.weights.state_copy())
    xt = torch.from_numpy(x)[None, None]
    ref = iwae_curve(model, xt.expand(10, 1, 28, 28), (1, 10, 100), generator=torch.Generator().manual_seed(1))
    assert abs(out.elbo - ref["elbo"]) < 6 * ref["elbo_se"] + 1e-3  # other draws: equal within Monte Carlo error
    assert abs(out.iwae - ref["iwae"][-1]) < 4 * (out.iwae_se + ref["iwae_se"][-1]) + 1e-3
    grid = posterior_grid(model, xt[0], n=64, reference_samples=0)
    assert out.grid.log_px == pytest.approx(grid.log_px, abs=1e-6)


def test_more_latents_have_no_grid_and_a_missing_dataset_still_encodes(tiny_config):
    cfg = tiny_config.replace(latent_dim=5, dataset="mnist")
    w = Weights(cfg, data_dir="/nonexistent")
    torch.manual_seed(0)
    w.publish(build_model(ModelConfig(latent_dim=5, hidden_dim=64)).state_dict(), 7)

    from vae_core import own_input
    from vae_core.records import DatasetUnavailable

    def unavailable():
        raise DatasetUnavailable("MNIST is not on this machine")

    w.dataset = unavailable
    out = own_input.own_input(w, np.full((28, 28), 0.5, np.float32))
    assert out.grid is None and out.mu.shape == (5,) and out.step == 7
    assert out.test is None and "MNIST" in out.test_missing
    assert out.elbo <= out.iwae + 3 * out.iwae_se
    with pytest.raises(ValueError, match="28 x 28"):
        own_input.own_input(w, np.zeros((27, 28)))


def test_test_bounds_are_computed_once_per_published_weights(tiny_config, tiny_sprites):
    from vae_core import own_input

    w = Weights(tiny_config, data=tiny_sprites)
    torch.manual_seed(1)
    w.publish(build_model(tiny_config.model).state_dict(), 1)
    x = tiny_sprites.test_x[0, 0].numpy()
    first = own_input.own_input(w, x)
    assert own_input.own_input(w, np.zeros((28, 28), np.float32)).test is first.test  # another drawing: reused
    torch.manual_seed(2)
    w.publish(build_model(tiny_config.model).state_dict(), 2)  # new weights: new test numbers
    second = own_input.own_input(w, x)
    assert second.test is not first.test and second.test.elbo != first.test.elbo and second.step == 2


def test_a_colour_run_refuses_own_input_in_one_line(tmp_path):
    from vae_core import runs
    from vae_core.config import RunConfig

    cfg = RunConfig().replace(channels=3, image_size=32, arch="conv")
    path = runs.create_run_dir(tmp_path, cfg, "colour")
    runs.write_config(path, cfg, created=0.0, parent=None)
    with pytest.raises(ImageInputError, match="28 x 28 grey") as e:
        Lab(tmp_path).open(path).own_input(png(np.zeros((28, 28))))
    assert "\n" not in str(e.value)
