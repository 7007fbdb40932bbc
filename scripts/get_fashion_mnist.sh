#!/usr/bin/env bash
# Make sure Fashion-MNIST is on this machine: Debian's dataset-fashion-mnist puts the IDX files under
# /usr/share/datasets/fashion-mnist. Installs it with apt-get when missing and possible (root, apt available);
# otherwise says what to do and returns non-zero (slimmable can also read a folder given with data.root, or
# download with torchvision when online).
set -uo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -f "$DIR/train-images-idx3-ubyte" ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[data] installing Debian's dataset-fashion-mnist (Fashion-MNIST, 30 MB)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; then
        exit 0
    fi
    echo "[data] apt-get could not install dataset-fashion-mnist" >&2
fi
echo "[data] Fashion-MNIST not found in $DIR. Install it with 'apt-get install dataset-fashion-mnist'," \
     "or point the recipe at a folder holding the IDX files (--set data.root=PATH)," \
     "or let torchvision download it (needs internet)." >&2
exit 1
