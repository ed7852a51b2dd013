#!/bin/sh
# Remake the example runs shipped in examples/*.zip with the project's own CLI: one
# `python -m vae_core train` per recipe (vae_core/examples.py lists them; `--print` shows the
# commands), each exported as a zip without the optimizer's state. The Fashion-MNIST ones need the
# dataset on this machine (Debian: apt-get install dataset-fashion-mnist, or --data-dir DIR).
# About 15 minutes on a quiet 2-core machine. Extra arguments go to every `train`.
set -e
cd "$(dirname "$0")/.."
exec python -m vae_core.examples --out examples "$@"
