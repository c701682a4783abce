#!/usr/bin/env bash
# GPU runs of the flows (#12) and score-SDE (#11) families on ONE H200, in at most 9 minutes of wall time.
#
#   OUT=/path/to/results bash benchmarks/families_gpu.sh        # from the repository root
#
# Data: ./_data/cifar10_jpg/cifar10-images-jpg.tar.gz and ./_data/mnist_png/mnist-pngs.tar.gz (the
# layout of ../shared/data; the tarballs directly in ./_data also do), unpacked into
# ./_data/{cifar10,mnist}. Four parts run at the same time as background processes, each under its
# own `timeout` (none is a timing claim, so sharing the card only costs wall time), each writing its
# log, JSON and at most one or two PNGs under $OUT as it goes, so a part that fails or runs out of
# time leaves what it measured and the others go on:
#
#   a) flow matching vs DDPM / DDIM on CIFAR-10, the same core UNet (5.85M parameters) and the same
#      steps / batch / lr: FD-pixels against NFE (benchmarks/flows_vs_ddpm_images.py)
#   b) RealNVP's multi-scale conv flow on MNIST: test bits/dim (benchmarks/flows_mnist.py)
#   c) `notelab reproduce sde` full run
#   d) `notelab reproduce flows` full run (may not finish in the limit: its progress log says how far)
#
# $OUT/summary.md collects the last lines of every log at the end. PARTS="a b" runs only those parts;
# SMOKE=1 runs the same plumbing on a CPU at toy sizes (quick claims) to check the script itself.
set -u
OUT=${OUT:?set OUT to the results folder}
LIMIT=${LIMIT:-500}   # seconds per part; the parts run concurrently, so the whole script stays under 9 minutes
DATA=${DATA:-_data}
if [ "${SMOKE:-0}" = 1 ]; then
  A_SIZE="--steps 3 --batch-size 8 --samples 32 --max-images 256 --nfe 1 20"
  B_SIZE="--steps 3 --batch-size 8 --max-images 256 --test-images 32"
  DEVICE=cpu QUICK=--quick
else
  A_SIZE="--steps 3000 --batch-size 128 --samples 2000 --nfe 1 2 5 10 20 50 100"
  B_SIZE="--steps 5000 --batch-size 256 --max-images 60000 --test-images 10000"
  DEVICE=cuda QUICK=
fi
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

unpack() {  # unpack the first TARBALL found into DEST once (train/ and test/ image folders)
  local dest=$1 tarball=
  shift
  if [ ! -d "$dest/train" ]; then
    for f in "$@"; do [ -f "$f" ] && { tarball=$f; break; }; done
    [ -n "$tarball" ] || { echo "none of $* found"; return 1; }
    mkdir -p "$dest" && tar xzf "$tarball" -C "$dest" || { echo "cannot unpack $tarball"; return 1; }
  fi
  echo "images in $dest: $(find "$dest/train" -type f | wc -l) training files"
}

part_a() {
  stamp "a) flow matching vs DDPM / DDIM on CIFAR-10"
  unpack "$DATA/cifar10" "$DATA/cifar10_jpg/cifar10-images-jpg.tar.gz" "$DATA/cifar10-images-jpg.tar.gz" || return 1
  timeout "$LIMIT" python3 benchmarks/flows_vs_ddpm_images.py --data "$DATA/cifar10/train" --test "$DATA/cifar10/test" \
    $A_SIZE --lr 2e-4 --device $DEVICE \
    --json "$OUT/a_fm_vs_ddpm_cifar10.json" --png-dir "$OUT" --png-nfe 20
  stamp "a) exit $?"
}

part_b() {
  stamp "b) RealNVP multi-scale on MNIST"
  unpack "$DATA/mnist" "$DATA/mnist_png/mnist-pngs.tar.gz" "$DATA/mnist-pngs.tar.gz" || return 1
  timeout "$LIMIT" python3 benchmarks/flows_mnist.py --data "$DATA/mnist" --models realnvp --arch multiscale \
    --hidden 64 --depth 2 $B_SIZE --lr 1e-3 \
    --device $DEVICE --json "$OUT/b_realnvp_mnist.json" --png "$OUT/realnvp_mnist_samples.png"
  stamp "b) exit $?"
}

part_c() {
  stamp "c) notelab reproduce sde ${QUICK:-(full)}"
  timeout "$LIMIT" python3 -m notelab reproduce sde $QUICK --out "$OUT/reports_sde"
  stamp "c) exit $?"
}

part_d() {
  stamp "d) notelab reproduce flows ${QUICK:-(full)}"
  timeout "$LIMIT" python3 -m notelab reproduce flows $QUICK --out "$OUT/reports_flows"
  stamp "d) exit $?"
}

PARTS=${PARTS:-a b c d}
case " $PARTS " in *" a "*) part_a > "$OUT/a_fm_vs_ddpm_cifar10.log" 2>&1 & ;; esac
case " $PARTS " in *" b "*) part_b > "$OUT/b_realnvp_mnist.log" 2>&1 & ;; esac
case " $PARTS " in *" c "*) part_c > "$OUT/c_reproduce_sde.log" 2>&1 & ;; esac
case " $PARTS " in *" d "*) part_d > "$OUT/d_reproduce_flows.log" 2>&1 & ;; esac
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
