#!/usr/bin/env bash
# Install the real data set of `python -m comparisons run --suite fashion-mnist`: Fashion-MNIST (60,000 + 10,000
# 28x28 images, 31 MB) from Debian's package dataset-fashion-mnist, which puts the original IDX files in
# /usr/share/datasets/fashion-mnist, where linf_plugin looks for them.  Nothing else is downloaded, ever.
# Exit status 0 when the files are in place afterwards, 1 when they could not be installed (the message says
# what to do).
set -uo pipefail

DIR=/usr/share/datasets/fashion-mnist
PKG=dataset-fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

present() { for f in $FILES; do [ -s "$DIR/$f" ] || return 1; done; }
elsewhere="Or put the four files ($FILES, from the Fashion-MNIST project, github.com/zalandoresearch/fashion-mnist) \
in <root>/FashionMNIST/raw/ and pass --data-root <root> or set LINF_DATA_ROOT=<root>."

if present; then
  echo "Fashion-MNIST is installed: $DIR"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "make data: no apt-get on this machine (the package $PKG is Debian's and Ubuntu's)." >&2
  echo "$elsewhere" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "make data: installing a system package needs root. Run:" >&2
  echo "    sudo apt-get install -y $PKG        (or: sudo make data)" >&2
  echo "$elsewhere" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y --no-install-recommends "$PKG"; }
# the package lists may be missing or stale on a fresh machine: update only when the install needs it
if ! install; then
  echo "make data: retrying after apt-get update" >&2
  apt-get update && install
fi
if present; then
  echo "Fashion-MNIST is installed: $DIR"
  exit 0
fi
echo "make data: could not install $PKG (no network, or no such package in this distribution's lists)." >&2
echo "$elsewhere" >&2
exit 1
