"""Your own images in the dashboard: a folder path or an uploaded zip, described before training; colour runs draw."""
from __future__ import annotations

import io
import stat
import zipfile

import numpy as np
import pytest
import streamlit as st

from image_files import make_mixed_folder, write_image
from vae_core.image_folders import ZIP_MAX_BYTES, extract_zip
from vae_core.lab import Lab
from vae_core.records import DatasetUnavailable


def _png_bytes(seed: int, size=(20, 20)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        for name in links:  # a symlink member pointing out of the folder
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_zip_extraction_keeps_images_inside_the_folder_only(tmp_path):
    data = _zip([("set/cats/a.png", _png_bytes(0)), ("set/dogs/b.png", _png_bytes(1)),
                 ("set/../../evil.png", _png_bytes(2)), ("/abs.png", _png_bytes(3)), ("set/readme.txt", b"hi"),
                 ("set/.hidden.png", _png_bytes(4)), ("__MACOSX/set/._a.png", b"junk")], links=("set/link.png",))
    out = extract_zip(data, tmp_path / "uploads")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink())
    assert files == ["cats/a.png", "dogs/b.png"]  # one top folder is the dataset folder itself
    assert not (tmp_path / "evil.png").exists() and not any(p.is_symlink() for p in out.rglob("*"))
    assert out.parent == tmp_path / "uploads" and [p.name[:1] for p in out.parent.iterdir()] == ["u"]  # no temp left
    assert extract_zip(data, tmp_path / "uploads") == out  # the same upload, the same folder


def test_zip_without_images_or_too_large_or_not_a_zip_is_refused_in_one_line(tmp_path, monkeypatch):
    for data, words in ((_zip([("a.txt", b"x")]), "no PNG"), (b"not a zip", "not a readable zip")):
        with pytest.raises(DatasetUnavailable, match=words):
            extract_zip(data, tmp_path / "u")
    monkeypatch.setattr("vae_core.image_folders.ZIP_MAX_EXTRACTED", 100)
    with pytest.raises(DatasetUnavailable, match="unpacks to more than"):
        extract_zip(_zip([("a.png", _png_bytes(0))]), tmp_path / "u")
    with pytest.raises(DatasetUnavailable, match="limit is"):
        extract_zip(b"x" * (ZIP_MAX_BYTES + 1), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not any((tmp_path / "u").iterdir())


def test_describe_says_count_labels_sizes_and_shape_before_training(tmp_path):
    bad = make_mixed_folder(tmp_path / "pets", n_per_class=6)
    ok, text = Lab.describe_dataset(f"folder:{tmp_path / 'pets'}")
    # 16 files named as images (4 of them bad inside: found when decoded); the link out is skipped at once
    assert ok and "16 image files" in text and "2 labels (cats, dogs)" in text and "3×64×64" in text
    assert "4×4 to 90×60" in text and f"{len(bad) - 4} other files will be skipped" in text
    ok, text = Lab.describe_dataset(f"folder:{tmp_path / 'nothing'}")
    assert not ok and "no folder" in text
    ok, text = Lab.describe_dataset("cifar10")
    assert ok and "32×32" in text


@pytest.fixture
def colour_folder(tmp_path, monkeypatch, runs_dir):
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    for c in ("red", "blue"):
        for i in range(40):
            write_image(tmp_path / "colour" / c / f"{i}.png", (16, 16), "RGB", "PNG", seed=i + (100 if c == "red" else 0))
    yield tmp_path / "colour"
    from dashboard.state import get_lab

    get_lab().shutdown()
    st.cache_resource.clear()


@pytest.mark.slow
def test_a_folder_is_chosen_by_path_trains_and_every_tab_draws_colour(colour_folder):
    from test_app import configure, errors, run_of, run_until, session, status_text

    app = session()
    app.run()
    app.selectbox(key="cfg_dataset").set_value("folder:").run()
    assert errors(app)  # no path yet: Train is refused with the config's message
    app.text_input(key="dsp_path").set_value(str(colour_folder)).run()
    app.button(key="dsp_use").click().run()
    assert app.session_state["cfg_dataset"] == f"folder:{colour_folder}"
    assert any("80 image files" in c.value and "2 labels (blue, red)" in c.value for c in app.caption)
    configure(app, cfg_epochs=2, cfg_train_size=0, cfg_batch_size=16).run()
    assert not errors(app)
    app.button(key="btn_train").click()
    run_until(app, lambda a: "Finished" in status_text(a, "success"), what="finished colour run")
    run = run_of(app)
    assert run.config.model.image_shape == (3, 16, 16)
    assert run.artifacts()["samples"].shape == (64, 16, 16, 3)
    for title in ["Training", "Explore latent space", "Evidence: ELBO ≤ log p(x)", "Runs"]:
        app.session_state["main_tab"] = title
        app.run()
        assert not app.exception and not errors(app), title


def test_the_runs_table_names_a_folder_by_its_last_part_only():
    from dashboard.panels.runs import dataset_label

    assert dataset_label("folder:/srv/private/pets/") == "folder: pets"
    assert dataset_label("mnist") == "mnist"
