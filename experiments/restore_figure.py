"""Figure: input, Dec(μ), restoration, healthy T1 and |restoration − input| for a few cases.

Reads the volumes restore_fidelity.py saved (--out) for two variants; each row is a case's
axial slice with the most tumour, tumour outline in red.

  python experiments/restore_figure.py --workdir=W --runs=/work/scratch12b \
      --reconstruct=reconstruct --restore=fixed_s1_l0.4 --out=fig.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

from experiments import restore_fidelity


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--runs', required=True)
  parser.add_argument('--reconstruct', default='reconstruct')
  parser.add_argument('--restore', required=True)
  parser.add_argument('--cases', default='0,2,4,13', help='indices into the sorted cases')
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  config, _, _, wd, landmarks = restore_fidelity.load(args.workdir)
  data = restore_fidelity.cases(config, wd, landmarks)
  picked = [data[int(i)] for i in args.cases.split(',')]
  with np.load(Path(args.runs) / args.reconstruct / 'volumes.npz') as z:
    recon = {cid: z[cid].astype(np.float32) for cid, *_ in picked}
  with np.load(Path(args.runs) / args.restore / 'volumes.npz') as z:
    restored = {cid: z[cid].astype(np.float32) for cid, *_ in picked}
  titles = ('input T1', 'Dec(μ)', f'restored ({args.restore})', 'healthy T1',
            '|restored − input|')
  fig, axes = plt.subplots(len(picked), len(titles), figsize=(2.2 * len(titles),
                                                              2.5 * len(picked)))
  for row, (cid, unit, healthy, _, label) in zip(axes, picked):
    z = int(np.argmax((label > 0).sum(axis=(1, 2))))
    panels = (unit[z], recon[cid][z], restored[cid][z], healthy[z],
              np.abs(restored[cid][z] - unit[z]))
    for col, (ax, image, title) in enumerate(zip(row, panels, titles)):
      diff = col == len(titles) - 1
      ax.imshow(image, cmap='magma' if diff else 'gray', vmin=0 if diff else -1,
                vmax=1, interpolation='nearest')
      ax.contour(label[z] > 0, levels=[0.5], colors='red', linewidths=0.6)
      ax.set_title(title if col else f'{cid} z{z}\n{title}', fontsize=7)
      ax.axis('off')
  fig.tight_layout()
  fig.savefig(args.out, dpi=90)


if __name__ == '__main__':
  main()
