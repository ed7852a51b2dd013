#!/bin/sh
# Remake the example runs shipped in examples/*.zip with the project's own CLI: one
# `python -m vae_core train` per recipe (vae_core/examples.py lists them; `--print` shows the
# commands), each exported as a zip without the optimizer's state. The Fashion-MNIST ones need the
# dataset on this machine (Debian: apt-get install dataset-fashion-mnist, or --data-dir DIR).
# Extra arguments go to every `train`. The shipped zips were made with `--threads 1`, one process per
# example (--only NAME), a few minutes in all: beside other work on 2 cores a 2-thread run was ~10x slower.
set -e
cd "$(dirname "$0")/.."
exec python -m vae_core.examples --out examples "$@"
