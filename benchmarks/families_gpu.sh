#!/usr/bin/env bash
# GPU runs of the flows (#12) and score-SDE (#11) families on ONE H200, in at most 9 minutes of wall time.
#
#   OUT=/path/to/results bash benchmarks/families_gpu.sh        # from the repository root
#
# Data: ./_data/cifar10_jpg/cifar10-images-jpg.tar.gz and ./_data/mnist_png/mnist-pngs.tar.gz (the
# layout of ../shared/data), unpacked here into ./_data/{cifar10,mnist}. Four parts run at the same
# time as background processes, each under its own `timeout` (none is a timing claim, so sharing the
# card only costs wall time), each writing its log, JSON and at most one or two PNGs under $OUT as it
# goes, so a part that fails or runs out of time leaves what it measured and the others go on:
#
#   a) flow matching vs DDPM / DDIM on CIFAR-10, the same core UNet (5.85M parameters) and the same
#      steps / batch / lr: FD-pixels against NFE (benchmarks/flows_vs_ddpm_images.py)
#   b) RealNVP's multi-scale conv flow on MNIST: test bits/dim (benchmarks/flows_mnist.py)
#   c) `notelab reproduce sde` full run
#   d) `notelab reproduce flows` full run (may not finish in the limit: its progress log says how far)
#
# $OUT/summary.md collects the last lines of every log at the end.
set -u
OUT=${OUT:?set OUT to the results folder}
LIMIT=${LIMIT:-500}   # seconds per part; the parts run concurrently, so the whole script stays under 9 minutes
DATA=${DATA:-_data}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
START=$(date +%s)
stamp() { echo "[$(($(date +%s) - START)) s] $*"; }

{
  stamp "start"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, torchdiffeq, safetensors, PIL; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  git log --oneline -1
} > "$OUT/env.log" 2>&1

unpack() {  # unpack TARBALL into DEST once (train/ and test/ image folders)
  local tarball=$1 dest=$2
  if [ ! -d "$dest/train" ]; then
    mkdir -p "$dest" && tar xzf "$tarball" -C "$dest" || { echo "cannot unpack $tarball"; return 1; }
  fi
  echo "unpacked $tarball into $dest: $(find "$dest/train" -type f | wc -l) training files"
}

part_a() {
  stamp "a) flow matching vs DDPM / DDIM on CIFAR-10"
  unpack "$DATA/cifar10_jpg/cifar10-images-jpg.tar.gz" "$DATA/cifar10" || return 1
  timeout "$LIMIT" python3 benchmarks/flows_vs_ddpm_images.py --data "$DATA/cifar10/train" --test "$DATA/cifar10/test" \
    --steps 3000 --batch-size 128 --lr 2e-4 --samples 2000 --nfe 1 2 5 10 20 50 100 --device cuda \
    --json "$OUT/a_fm_vs_ddpm_cifar10.json" --png-dir "$OUT" --png-nfe 20
  stamp "a) exit $?"
}

part_b() {
  stamp "b) RealNVP multi-scale on MNIST"
  unpack "$DATA/mnist_png/mnist-pngs.tar.gz" "$DATA/mnist" || return 1
  timeout "$LIMIT" python3 benchmarks/flows_mnist.py --data "$DATA/mnist" --models realnvp --arch multiscale \
    --hidden 64 --depth 2 --steps 5000 --batch-size 256 --lr 1e-3 --max-images 60000 --test-images 10000 \
    --device cuda --json "$OUT/b_realnvp_mnist.json" --png "$OUT/realnvp_mnist_samples.png"
  stamp "b) exit $?"
}

part_c() {
  stamp "c) notelab reproduce sde (full)"
  timeout "$LIMIT" python3 -m notelab reproduce sde --out "$OUT/reports_sde"
  stamp "c) exit $?"
}

part_d() {
  stamp "d) notelab reproduce flows (full)"
  timeout "$LIMIT" python3 -m notelab reproduce flows --out "$OUT/reports_flows"
  stamp "d) exit $?"
}

part_a > "$OUT/a_fm_vs_ddpm_cifar10.log" 2>&1 &
part_b > "$OUT/b_realnvp_mnist.log" 2>&1 &
part_c > "$OUT/c_reproduce_sde.log" 2>&1 &
part_d > "$OUT/d_reproduce_flows.log" 2>&1 &
wait

# Keep the reports small: figures of the claims stay only as the HTML's; weights are dropped.
find "$OUT" -name '*.safetensors' -delete 2>/dev/null
find "$OUT" -path '*reports_*' -name '*.png' -delete 2>/dev/null
{
  echo "# families_gpu.sh, $(date -u +%F), $(($(date +%s) - START)) s"
  cat "$OUT/env.log"
  for f in "$OUT"/[abcd]_*.log; do
    echo
    echo "## $(basename "$f")"
    echo '```'
    grep -v 'it/s' "$f" | tail -n 25
    echo '```'
  done
} > "$OUT/summary.md"
stamp "done"
cat "$OUT/summary.md"
