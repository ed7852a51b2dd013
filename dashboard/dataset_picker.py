"""The sidebar's dataset picker: the built-in sets, CIFAR-10 and CelebA, and your own images.

Your own images are a folder on the server (its path) or an uploaded zip, unpacked safely on the
server. Whatever is chosen is described before training: where it comes from, how many images,
their sizes and the shape a run will train at.
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard.common import md_text
from dashboard.settings import DATASET_NAMES, LABELS, PREFIX
from vae_core.lab import DATASETS, Lab, UserError

FOLDER_CHOICE = "folder:"  # "your own images", before a folder is given (the config refuses it: no path)
COLOUR_NAMES = {"cifar10": "CIFAR-10 (colour 32×32)", "celeba": "CelebA faces (colour 64×64)"}
KEY = "dsp_"
ZIP_LIMIT_MB = 200  # vae_core.image_folders.ZIP_MAX_BYTES


def options(current: Any) -> list[str]:
    """Every choice, with the current folder (from a run or a path given earlier) among them."""
    out = [*DATASETS, *COLOUR_NAMES, FOLDER_CHOICE]
    if isinstance(current, str) and current.startswith("folder:") and current != FOLDER_CHOICE:
        out.insert(len(out) - 1, current)
    return out


def label(name: str, availability: dict[str, tuple[bool, str]]) -> str:
    if name == FOLDER_CHOICE:
        return "Your own images (a folder or a zip)…"
    if name.startswith("folder:"):
        return "Folder: " + name.rstrip("/").rsplit("/", 1)[-1]
    text = DATASET_NAMES.get(name) or COLOUR_NAMES.get(name, name)
    return text + ("" if availability.get(name, (True, ""))[0] else " — unavailable")


@st.cache_data(ttl=30, show_spinner=False)
def describe(name: str) -> tuple[bool, str]:
    """Lab.describe_dataset, kept 30 s: a folder's description reads up to 2,000 image headers."""
    return Lab.describe_dataset(name)


def _use_folder() -> None:
    path = str(st.session_state.get(KEY + "path", "")).strip()
    if not path:
        st.session_state[KEY + "message"] = ("error", "Type the folder's path on the server first.")
        return
    ok, text = Lab.describe_dataset("folder:" + path)
    if ok:
        st.session_state[PREFIX + "dataset"] = "folder:" + path
        st.session_state[KEY + "message"] = None
    else:
        st.session_state[KEY + "message"] = ("error", text.replace(path, "that folder"))


def _use_zip() -> None:
    upload = st.session_state.get(KEY + "zip")
    if upload is None:
        return
    try:
        name = Lab.unpack_images_zip(upload.getvalue())
    except UserError as e:
        st.session_state[KEY + "message"] = ("error", f"{upload.name}: {e}")
        return
    ok, text = Lab.describe_dataset(name)
    if ok:
        st.session_state[PREFIX + "dataset"] = name
        st.session_state[KEY + "message"] = ("success", f"Unpacked {upload.name}.")
    else:
        st.session_state[KEY + "message"] = ("error", f"{upload.name}: {text}")


def render(availability: dict[str, tuple[bool, str]]) -> None:
    """The dataset selectbox (key cfg_dataset), the folder/zip inputs when asked for, and the description."""
    current = st.session_state.get(PREFIX + "dataset")
    st.selectbox(LABELS["dataset"], options(current), key=PREFIX + "dataset",
                 format_func=lambda n: label(n, availability))
    chosen = st.session_state[PREFIX + "dataset"]
    if chosen == FOLDER_CHOICE or str(chosen).startswith("folder:"):
        with st.expander("Your own images", expanded=chosen == FOLDER_CHOICE):
            st.text_input("Folder on the server", key=KEY + "path", placeholder="/data/my-images",
                          help="Sub-folders are labels (torchvision's ImageFolder layout); a flat folder has none. "
                               "PNG, JPEG or WebP, any size, grey or colour.")
            st.button("Use this folder", key=KEY + "use", on_click=_use_folder)
            st.file_uploader(f"…or upload a zip of images (up to {ZIP_LIMIT_MB} MB)", type=["zip"], key=KEY + "zip")
            st.button("Unpack and use the zip", key=KEY + "unzip", on_click=_use_zip)
            message = st.session_state.get(KEY + "message")
            if message:
                getattr(st, message[0])(md_text(message[1]))
    if chosen == FOLDER_CHOICE:
        return
    if chosen in DATASETS:
        ok, reason = availability.get(chosen, (True, ""))
    else:
        ok, reason = describe(chosen)
    if ok:
        st.caption(md_text(reason[:1].upper() + reason[1:]))
    elif chosen not in DATASETS:  # (a built-in set's reason shows as the control's error)
        st.warning(md_text(reason))
